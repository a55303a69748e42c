#!/usr/bin/env bash
# The serving bar, end to end on this machine (docs/serving.md):
#   1. a Ray head node (`ray start --head --block`, stopped by its process group at the end);
#   2. `hyperlora serve --address auto` on it;
#   3. a document internalized through POST /v1/documents, then asked about with the unchanged
#      `openai` client (model=<that adapter id>), and /v1/models checked to list the adapter;
#   4. `hyperlora ingest` of 20 documents on Ray Data into the same store, and the store counted.
# Usage: scripts/serve_demo.sh [--tiny]   (--tiny: the random test model, fast, answers gibberish)
# Needs the [serve] extra (make setup installs it). Prints one line per step; exits non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODEL_ARGS=()
if [[ "${1:-}" == "--tiny" ]]; then MODEL_ARGS=(--tiny); fi
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token  # `ray start` enables token auth; its clients must use it
WORK=$(mktemp -d /tmp/hlserve.XXXX)
PORT=${PORT:-8123}
RAY_PORT=${RAY_PORT:-6390}
STORE="$WORK/store"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

t0=$(date +%s)
setsid "$BIN/ray" start --head --block --port="$RAY_PORT" --node-ip-address=127.0.0.1 --num-cpus=2 \
  --include-dashboard=false --disable-usage-stats --temp-dir="$WORK/ray" >"$WORK/ray.log" 2>&1 &
PIDS+=($!)
export RAY_ADDRESS="127.0.0.1:$RAY_PORT"
until "$BIN/ray" status >/dev/null 2>&1; do sleep 2; done
echo "ray head up ($(( $(date +%s) - t0 )) s)"

setsid "$BIN/hyperlora" serve --address auto --port "$PORT" --store "$STORE" --replica-cpus 0.5 --threads 1 \
  "${MODEL_ARGS[@]}" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  sleep 2
  if ! kill -0 "${PIDS[1]}" 2>/dev/null; then tail -30 "$WORK/serve.log"; exit 1; fi
done
echo "hyperlora serve up at http://127.0.0.1:$PORT/v1 ($(( $(date +%s) - t0 )) s)"

"$BIN/python" - "$PORT" <<'EOF'
import json, sys, time, urllib.request
from openai import OpenAI

url = f"http://127.0.0.1:{sys.argv[1]}/v1"
doc = ("The Vellmoor observatory was founded in 1911 by the astronomer Ilse Marran. "
       "Its main telescope, nicknamed Old Copper, has a 60-centimetre mirror.")
req = urllib.request.Request(f"{url}/documents", data=json.dumps({"documents": [{"text": doc}]}).encode(),
                             headers={"Content-Type": "application/json"})
t = time.perf_counter()
adapter_id = json.load(urllib.request.urlopen(req))["ids"][0]
print(f"POST /v1/documents -> {adapter_id} ({time.perf_counter() - t:.1f} s)")
client = OpenAI(base_url=url, api_key="unused")
assert adapter_id in [m.id for m in client.models.list().data], "adapter missing from /v1/models"
print("GET /v1/models lists it")
t = time.perf_counter()
reply = client.chat.completions.create(
    model=adapter_id, messages=[{"role": "user", "content": "Who founded the Vellmoor observatory?"}],
    max_tokens=32, temperature=0)
answer = reply.choices[0].message.content
assert answer, "empty answer"  # the --tiny model may answer in whitespace; the real one in words
print(f"openai client, model={adapter_id}: {answer!r} ({time.perf_counter() - t:.1f} s)")
EOF

mkdir -p "$WORK/corpus"
for i in $(seq 1 20); do
  echo "Field note $i: the survey team logged $((i * 37 % 101)) birds at station $i on day $((i % 7 + 1))." \
    >"$WORK/corpus/note$i.txt"
done
"$BIN/hyperlora" ingest "$WORK/corpus" --store "$STORE" --address auto --threads 1 --actor-cpus 0.5 "${MODEL_ARGS[@]}" \
  >"$WORK/ingest.json" 2>"$WORK/ingest.log"
cat "$WORK/ingest.json"
"$BIN/python" - "$STORE" <<'EOF'
import sys
from hyperlora_integrations.adapters import AdapterStore

with AdapterStore(sys.argv[1]) as store:
    n = len(store.list(namespace="default"))
print(f"store holds {n} document adapters (1 posted + 20 ingested)")
assert n == 21, n
EOF
echo "done in $(( $(date +%s) - t0 )) s"
