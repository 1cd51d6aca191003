#!/usr/bin/env bash
# Installs what `make test` and `make demo` need when it is missing: ip
# (iproute2) and nsenter (util-linux) for the network-namespace tests,
# nc for trying the demo, etcd (etcd-server) for the fleet tests, haproxy
# for the PROXY protocol tests (it sends the header in front of edgeproxy).
# Go itself must already be installed.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v nc >/dev/null || missing+=(netcat-openbsd)
command -v etcd >/dev/null || missing+=(etcd-server)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v go >/dev/null || { echo "deps: Go is not installed (https://go.dev/dl/); edgeproxy needs Go 1.26" >&2; exit 1; }
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "deps: missing ${missing[*]}; run as root (sudo make ...) to install them" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
