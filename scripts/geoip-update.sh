#!/usr/bin/env bash
# Refreshes the geolocation database embedded in edgeproxy
# (routing/geodata/geo-whois-asn-country.mmdb.gz) from the npm package
# @ip-location-db/geo-whois-asn-country-mmdb, and records the version it
# fetched in routing/geodata/VERSION and NOTICE.
#
# Usage: scripts/geoip-update.sh [VERSION]    (default: the latest on npm)
#
# Needs npm, tar, gzip and go. Review the diff, then commit the three files.
set -euo pipefail

readonly pkg=@ip-location-db/geo-whois-asn-country-mmdb
readonly file=geo-whois-asn-country.mmdb

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
readonly root
readonly geodata=$root/routing/geodata

version=${1:-$(npm view "$pkg" version)}
readonly version

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

echo "fetching $pkg@$version" >&2
tarball=$(cd -- "$work" && npm pack --silent "$pkg@$version")
tar -xzf "$work/$tarball" -C "$work" "package/$file"

# -n leaves the name and time out of the gzip header, so the same database
# always compresses to the same bytes and an unchanged refresh is no diff.
gzip -9 -n -c "$work/package/$file" >"$work/$file.gz"
mv -- "$work/$file.gz" "$geodata/$file.gz"
printf '%s\n' "$version" >"$geodata/VERSION"
sed -i -E "s|^(  npm package $pkg version ).*$|\\1$version|" "$root/NOTICE"
grep -qF "$pkg version $version" "$root/NOTICE" || {
	echo "NOTICE: could not record version $version; edit it by hand" >&2
	exit 1
}

# The embedded-database test checks the format and a few well-known lookups.
(cd -- "$root" && go test ./routing/ -run 'TestEmbeddedGeo' -count=1)
echo "updated $geodata/$file.gz to $version ($(wc -c <"$geodata/$file.gz") bytes)" >&2
