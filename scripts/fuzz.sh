#!/usr/bin/env bash
# A short run of every fuzz target (func FuzzXxx in a _test.go file), one
# at a time: go test -fuzz takes one target per run. Their committed seed
# corpora (testdata/fuzz) also run as plain tests in `go test ./...`.
#
#   bash scripts/fuzz.sh              # FUZZ_TIME per target, default 8s
#   FUZZ_TIME=10m bash scripts/fuzz.sh
#
# A failure leaves the crashing input in the package's testdata/fuzz/:
# commit it, it becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
fuzztime=${FUZZ_TIME:-8s}

mapfile -t targets < <(git ls-files '*_test.go' | xargs grep -H -o '^func Fuzz[A-Za-z0-9_]*' | sed 's/:func /:/')
if [[ ${#targets[@]} -eq 0 ]]; then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
for t in "${targets[@]}"; do
	file=${t%%:*} name=${t##*:}
	pkg=./$(dirname "$file")
	echo "fuzz: $name ($pkg) for $fuzztime"
	# One worker: the machine may be small, and a short run is for
	# finding crashes in what the seeds open up, not for coverage speed.
	$GO test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -parallel 1 "$pkg"
done
