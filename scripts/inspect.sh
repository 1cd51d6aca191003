#!/usr/bin/env bash
# Print edgeproxy's pinned BPF maps in readable form: the backend table the
# proxy is using, client affinity bindings, verdict counters and live
# pairings. Usage: sudo scripts/inspect.sh [PIN_PATH]  (default
# $EDGEPROXY_BPF_PIN_PATH or /sys/fs/bpf/edgeproxy). Needs bpftool and jq
# is optional (raw JSON without it).
set -euo pipefail
pin=${1:-${EDGEPROXY_BPF_PIN_PATH:-/sys/fs/bpf/edgeproxy}}
command -v bpftool >/dev/null || { echo "inspect: bpftool not found (apt-get install bpftool)" >&2; exit 1; }
[ -d "$pin" ] || { echo "inspect: no pin directory $pin (is edgeproxy running? set EDGEPROXY_BPF_PIN_PATH)" >&2; exit 1; }

dump() { bpftool -j map dump pinned "$pin/$1"; }
have_jq=false
command -v jq >/dev/null && have_jq=true

echo "== backends ($pin/backends)"
if [ -e "$pin/backends" ]; then
	if $have_jq; then
		dump backends | jq -r '
		  def ip: (.[10:12] == [255,255]) as $v4
		    | if $v4 then (.[12:16] | map(tostring) | join("."))
		      else ([range(0;16;2) as $i | (.[$i]*256 + .[$i+1]) | tostring] | join(":")) end;
		  ["SLOT","ID","ADDRESS","PORT","HEALTHY","WEIGHT","SOFT","HARD","ACTIVE"],
		  (.[] | .formatted? // . | select(.value.id != "" and .value.id != null)
		   | [.key, .value.id, (.value.addr | ip), .value.port, .value.healthy, .value.weight,
		      .value.soft_limit, .value.hard_limit, .value.active]) | @tsv' | column -t
	else dump backends; fi
else echo "(not pinned: the proxy is not running)"; fi

echo
echo "== affinity ($pin/affinity)"
if [ -e "$pin/affinity" ]; then
	if $have_jq; then
		dump affinity | jq -r '
		  def ip: (.[10:12] == [255,255]) as $v4
		    | if $v4 then (.[12:16] | map(tostring) | join("."))
		      else ([range(0;16;2) as $i | (.[$i]*256 + .[$i+1]) | tostring] | join(":")) end;
		  ["CLIENT","BACKEND","LAST_USED"],
		  (.[] | .formatted? // . | [(.key.addr | ip), .value.backend_id,
		     ((.value.last_used_unix_ns / 1e9) | floor | todate)]) | @tsv' | column -t
	else dump affinity; fi
else echo "(not pinned)"; fi

echo
echo "== verdicts ($pin/verdicts), summed over CPUs"
if [ -e "$pin/verdicts" ]; then
	reasons=(redirected pass_unpaired pass_unarmed pass_peer_gone pass_bad_flow drop_empty_fin)
	if $have_jq; then
		dump verdicts | jq -r '.[] | (.formatted? // .) | "\(.key) \([.values[].value] | add)"' |
			while read -r key total; do printf '%-16s %s\n' "${reasons[$key]:-reason$key}" "$total"; done
	else dump verdicts; fi
else echo "(not pinned: the proxy is not running)"; fi

echo
if [ -e "$pin/pairings" ]; then
	n=$(bpftool -j map dump pinned "$pin/pairings" | { $have_jq && jq length || grep -o '"key"' | wc -l; })
	echo "== pairings: $n sockets paired ($((n / 2)) connections)"
fi
