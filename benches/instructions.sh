#!/usr/bin/env bash
# User-space instructions per request of Lumen and of the bare Pingora proxy, counted by
# valgrind's callgrind: the same figure on every run of the same binaries, whatever else the
# machine does, so an A/B of one change can be read from one run each even where requests per
# second swing by 15% between runs (2 shared cores). Kernel time is not counted: syscalls per
# request are in `cargo bench --bench load`.
#
#   benches/instructions.sh [REQUESTS] [stream]     (after cargo build --release --workspace)
#   LUMEN_BIN=/tmp/lumen-before benches/instructions.sh    # another build of lumen
#   LUMEN_PROFILE=dist benches/instructions.sh     # the LTO builds (cargo build --profile dist)
#   LUMEN_PROFILE_DIR=/tmp/prof benches/instructions.sh   # keeps the dumps (callgrind_annotate)
#   LUMEN_API=translation benches/instructions.sh [REQUESTS] [stream]
#       # Lumen alone: the same answer asked for in chat completions, the Responses API and
#       # the Messages API (translated to chat and back), and what translation adds
#
# Each proxy gets 200 requests to warm up, then its counters are zeroed, REQUESTS (default
# 2000) chat requests of 1 KiB are sent on one keep-alive connection (streams of 5 chunks with
# `stream`), and the count is read. Lumen runs as in the load benchmark: a key with limits,
# metrics and the access log on, one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
STREAM=${2:-}
[ "$STREAM" = stream ] && STREAM=true || STREAM=false
R=target/${LUMEN_PROFILE:-release}
LUMEN=${LUMEN_BIN:-$R/lumen}
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)"; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

mock=$(port)
$R/lumen-mock-upstream --port "$mock" --threads 1 >/dev/null 2>&1 &
pids+=($!)

# measure NAME PORT COMMAND...: starts COMMAND under callgrind, loads it, prints Ir/request.
measure() {
  local name=$1 listen=$2
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" "$@" >"$work/$name.log" 2>&1 &
  local vg=$!
  pids+=("$vg")
  python3 - "$listen" "$N" "$STREAM" "$vg" "${API:-chat}" <<'PY'
import http.client, json, subprocess, sys, time
port, n, stream, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true", sys.argv[4]
api = sys.argv[5]
filler = "x" * 900
path, body = {
    "chat": ("/v1/chat/completions", {"model": "bench", "stream": stream, "mock_chunks": 5, "temperature": 0,
             "messages": [{"role": "user", "content": filler}]}),
    "responses": ("/v1/responses", {"model": "bench", "stream": stream, "mock_chunks": 5, "temperature": 0,
                  "input": filler, "store": False}),
    "messages": ("/v1/messages", {"model": "bench", "stream": stream, "mock_chunks": 5, "temperature": 0,
                 "max_tokens": 64, "messages": [{"role": "user", "content": filler}]}),
}[api]
body = json.dumps(body)
head = {"authorization": "Bearer lm-bench-key", "content-type": "application/json"}
deadline = time.time() + 120
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", path, body, head)
        r = c.getresponse(); r.read()
        if r.status == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"no answer on port {port}")
    time.sleep(0.5)
def go(k):
    for _ in range(k):
        c.request("POST", path, body, head)
        r = c.getresponse(); d = r.read()
        assert r.status == 200, (r.status, d)
go(200)
subprocess.run(["callgrind_control", "-z", pid], capture_output=True, check=True)
go(n)
subprocess.run(["callgrind_control", "-d", pid], capture_output=True, check=True)
PY
  local dump
  dump=$(ls -t "$work/$name.out".* | head -1)
  local ir
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  kill "$vg" 2>/dev/null || true
  # LUMEN_PROFILE_DIR=DIR keeps each dump there, for callgrind_annotate.
  [ -n "${LUMEN_PROFILE_DIR:-}" ] && cp "$dump" "$LUMEN_PROFILE_DIR/$name.callgrind"
  echo "$name $((ir / N))"
}

listen=$(port)
admin=$(port)
cat >"$work/lumen.yaml" <<YAML
listen: ["127.0.0.1:$listen"]
admin_listen: "127.0.0.1:$admin"
server: { threads: 1 }
keys: [ { id: bench, key: "lm-bench-key", limits: { requests_per_second: 1000000, concurrent_requests: 10000 } } ]
providers:
  mock: { base_url: "http://127.0.0.1:$mock/v1" }
routes:
  - { model: bench, targets: [ { provider: mock, model: bench-upstream } ] }
YAML
echo "user-space instructions per request ($N requests, 1 KiB, stream: $STREAM; callgrind)"
if [ "${LUMEN_API:-}" = translation ]; then
  for api in chat responses messages; do
    # a listener of its own for each run: the last one may still be letting go of its port
    l2=$(port)
    sed "s/127.0.0.1:$listen/127.0.0.1:$l2/; s/127.0.0.1:$admin/127.0.0.1:$(port)/" "$work/lumen.yaml" >"$work/$api.yaml"
    r=$(API=$api RUNTIME_DIRECTORY="$work" measure "lumen-$api" "$l2" "$LUMEN" serve --config "$work/$api.yaml")
    echo "  $r"
    [ "$api" = chat ] && chat=${r##* } || echo "    added by translation: $(( ${r##* } - chat ))"
  done
  exit 0
fi
l=$(RUNTIME_DIRECTORY="$work" measure lumen "$listen" "$LUMEN" serve --config "$work/lumen.yaml")
bare=$(port)
p=$(measure pingora "$bare" $R/lumen-bare-proxy --listen "127.0.0.1:$bare" --upstream "127.0.0.1:$mock")
echo "  $l"
echo "  $p"
python3 -c "import sys; l=int(sys.argv[1].split()[1]); p=int(sys.argv[2].split()[1]); print(f'  lumen/pingora {l/p:.2f}x')" "$l" "$p"
