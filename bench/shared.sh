#!/usr/bin/env bash
# One encoder for both tasks against the two-model path, same binary, same run (issue #14):
# starts `tidings serve` twice, with --topic-model auto on NER_MODEL (a model trained for both
# tasks: tidings_shared_encoder in its config.json) and with --topic-model TWO_MODEL_TOPICS
# (default models/minilm: a second encoder, today's path), drives them in turn with
# bench/run.py (never both at once; the article mix: the seed article, then AG News dev rows)
# and prints the throughput ratio. Extra arguments go to bench/run.py, e.g.
#
#   bench/shared.sh --concurrency 1,8 --requests 300
#
# Environment: NER_MODEL (models/ner), TWO_MODEL_TOPICS (models/minilm), TIDINGS_ARGS (extra
# arguments of both servers), SHARED_PORT (50073), TWO_PORT (50074), PYTHON (python3 with
# grpcio and protobuf, e.g. from bench/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
NER_MODEL=${NER_MODEL:-models/ner}
TWO_MODEL_TOPICS=${TWO_MODEL_TOPICS:-models/minilm}
SHARED_PORT=${SHARED_PORT:-50073}
TWO_PORT=${TWO_PORT:-50074}
LOGS=${LOGS:-$(mktemp -d /tmp/tidings-shared.XXXXXX)}

grep -q '"tidings_shared_encoder": true' "$NER_MODEL/config.json" \
  || { echo "shared.sh: $NER_MODEL is not trained for both tasks (no tidings_shared_encoder)" >&2; exit 2; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

"$PYTHON" bench/protos.py >/dev/null

# shellcheck disable=SC2086
target/release/tidings serve --addr "127.0.0.1:$SHARED_PORT" --ner-model "$NER_MODEL" \
  --topic-model auto ${TIDINGS_ARGS:-} >"$LOGS/shared.log" 2>&1 &
shared_pid=$!
pids+=("$shared_pid")
# shellcheck disable=SC2086
target/release/tidings serve --addr "127.0.0.1:$TWO_PORT" --ner-model "$NER_MODEL" \
  --topic-model "$TWO_MODEL_TOPICS" ${TIDINGS_ARGS:-} >"$LOGS/two-model.log" 2>&1 &
two_pid=$!
pids+=("$two_pid")

echo "shared.sh: server logs in $LOGS" >&2
"$PYTHON" bench/run.py --wait 180 \
  --tidings-addr "127.0.0.1:$SHARED_PORT" --tidings-pid "$shared_pid" --tidings-label "tidings-shared" \
  --reference-addr "127.0.0.1:$TWO_PORT" --reference-pid "$two_pid" --reference-label "tidings-two-model" \
  "$@"
