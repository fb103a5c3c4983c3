#!/usr/bin/env bash
# Starts `target/release/tidings serve` with default settings, runs bench/isolation.py against
# it (unary alone, `tidings batch` alone, both at once), then stops the server.
#
#   bench/isolation.sh                     # 30 s per phase, 5 s warm-up
#   bench/isolation.sh --seconds 60        # extra arguments go to bench/isolation.py
#
# Environment: ISO_PORT (50073), TIDINGS_BIN (target/release/tidings), TIDINGS_ARGS (extra
# arguments of `tidings serve`), PYTHON (python3; one with grpcio, grpcio-tools, protobuf).
set -euo pipefail
cd "$(dirname "$0")/.."

ISO_PORT=${ISO_PORT:-50073}
TIDINGS_BIN=${TIDINGS_BIN:-target/release/tidings}
PYTHON=${PYTHON:-python3}
LOGS=${LOGS:-$(mktemp -d /tmp/tidings-isolation-server.XXXXXX)}
mkdir -p "$LOGS"

pid=
cleanup() {
  if [[ -n "$pid" ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

"$PYTHON" bench/protos.py >/dev/null   # generate the stubs before anyone imports them

# shellcheck disable=SC2086
"$TIDINGS_BIN" serve --addr "127.0.0.1:$ISO_PORT" ${TIDINGS_ARGS:-} >"$LOGS/tidings.log" 2>&1 &
pid=$!
echo "isolation.sh: server log in $LOGS/tidings.log" >&2
"$PYTHON" bench/isolation.py --addr "127.0.0.1:$ISO_PORT" --pid "$pid" \
  --tidings-bin "$TIDINGS_BIN" --wait 180 "$@"
