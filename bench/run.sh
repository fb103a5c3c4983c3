#!/usr/bin/env bash
# Starts the reference server (and Tidings, if target/release/tidings has `serve`), waits for
# them, runs bench/run.py against both, then stops what it started.
#
#   bench/run.sh                       # 200 calls per level at concurrency 1, 8, 32
#   bench/run.sh --seconds 20          # extra arguments go to bench/run.py
#   PYTHON=/tmp/ortvenv/bin/python3 REF_BACKEND=ort-int8 bench/run.sh   # ONNX Runtime reference
#
# Environment: REF_BACKEND (the reference's --backend: torch (default), ort-fp32 or ort-int8),
# REF_THREADS (its torch / ONNX Runtime intra-op threads, default 2), REF_ARGS (extra arguments
# of bench/reference_server.py, e.g. --max-wait-ms 5), TIDINGS_PORT (50071), REF_PORT (50072);
# NER_MODEL (models/ner) and TAXONOMY (models/topics/news.json; empty for each server's
# built-in default) given to both servers; TIDINGS_NER_MODEL (NER_MODEL) given to Tidings
# instead, e.g. models/ner-accurate against a reference running the fast tier; TOPIC_MODEL (models/minilm) given to the reference,
# and to Tidings as TIDINGS_TOPIC_MODEL (auto: the NER model's own encoder when it was
# trained for both tasks; models/minilm runs the two-model path); TIDINGS_ARGS (extra
# arguments of `tidings serve`); NO_TIDINGS=1 to bench the reference only; PYTHON (python3:
# one with bench/requirements.txt for torch, bench/ort-requirements.txt for ort-*).
set -euo pipefail
cd "$(dirname "$0")/.."

TIDINGS_PORT=${TIDINGS_PORT:-50071}
REF_PORT=${REF_PORT:-50072}
REF_THREADS=${REF_THREADS:-2}
REF_BACKEND=${REF_BACKEND:-torch}
PYTHON=${PYTHON:-python3}
NER_MODEL=${NER_MODEL:-models/ner}
TIDINGS_NER_MODEL=${TIDINGS_NER_MODEL:-$NER_MODEL}
TOPIC_MODEL=${TOPIC_MODEL:-models/minilm}
TIDINGS_TOPIC_MODEL=${TIDINGS_TOPIC_MODEL:-auto}
TAXONOMY=${TAXONOMY-models/topics/news.json}   # default topics of both servers
LOGS=${LOGS:-$(mktemp -d /tmp/tidings-bench.XXXXXX)}
mkdir -p "$LOGS"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$PYTHON" bench/protos.py >/dev/null   # generate the stubs once, before anyone imports them

# shellcheck disable=SC2086
"$PYTHON" bench/reference_server.py --addr "127.0.0.1:$REF_PORT" --backend "$REF_BACKEND" \
  --threads "$REF_THREADS" --ner-model "$NER_MODEL" --topic-model "$TOPIC_MODEL" \
  ${TAXONOMY:+--taxonomy "$TAXONOMY"} ${REF_ARGS:-} >"$LOGS/reference.log" 2>&1 &
ref_pid=$!
pids+=("$ref_pid")
args=(--reference-addr "127.0.0.1:$REF_PORT" --reference-pid "$ref_pid")

if [[ -z "${NO_TIDINGS:-}" && -x target/release/tidings ]] \
   && target/release/tidings serve --help >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  target/release/tidings serve --addr "127.0.0.1:$TIDINGS_PORT" --ner-model "$TIDINGS_NER_MODEL" \
    --topic-model "$TIDINGS_TOPIC_MODEL" ${TAXONOMY:+--taxonomy "$TAXONOMY"} ${TIDINGS_ARGS:-} \
    >"$LOGS/tidings.log" 2>&1 &
  tid_pid=$!
  pids+=("$tid_pid")
  args+=(--tidings-addr "127.0.0.1:$TIDINGS_PORT" --tidings-pid "$tid_pid")
else
  echo "run.sh: no target/release/tidings with 'serve' (or NO_TIDINGS set): reference only" >&2
fi

echo "run.sh: server logs in $LOGS" >&2
"$PYTHON" bench/run.py "${args[@]}" --wait 180 "$@"
