#!/usr/bin/env bash
# Issue #11 on a CPU not measured before, in one go: which CPU it is, Tidings' encoder
# against ONNX Runtime at every shape (bench/ort_encoder.py), each f32 and int8 kernel this
# CPU runs against the others in interleaved `tidings bench` rounds (NER encoder), and
# `cargo bench --bench kernels` for each f32 tile and each int8 kernel. It builds nothing:
# give it the binaries, so that it also runs where there is no Rust toolchain (a borrowed
# machine). On a 2-core AMD EPYC Zen 5 it took 1 min 53 s with ROUNDS=1 MINILM=none; the
# defaults take a few minutes more.
#
#   cargo build --release && cargo bench --bench kernels --no-run
#   bench/cpu-check.sh                      # both models; results in target/cpu-check/
#   MINILM=none OUT=/tmp/out bench/cpu-check.sh   # NER only
#
# It runs from the repository's root: relative paths below are read from there. Environment:
# TIDINGS (target/release/tidings), KERNELS (the newest target/release/deps/kernels-*; if
# there is none, that step is skipped), PYTHON (python3, with bench/ort-requirements.txt),
# THREADS (2), ROUNDS (2: ort_encoder.py's rounds and the A/B rounds), MINILM (models/minilm;
# none, or missing, times the NER encoder only), SEED_ARTICLE and DEV_CSV (the article mix's
# sources; bench/ort_encoder.py's defaults), OUT (target/cpu-check). Each `tidings bench` run's
# whole output is kept under OUT/bench/; the rows name the kernel that actually ran (a name
# this CPU does not run falls back, with a warning).
set -euo pipefail
cd "$(dirname "$0")/.."

TIDINGS=${TIDINGS:-target/release/tidings}
KERNELS=${KERNELS:-$(ls -t target/release/deps/kernels-* 2>/dev/null | grep -v '\.d$' | head -1 || true)}
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
MINILM=${MINILM:-models/minilm}
OUT=${OUT:-target/cpu-check}
mix=()
[ -n "${SEED_ARTICLE:-}" ] && mix+=(--seed-article "$SEED_ARTICLE")
[ -n "${DEV_CSV:-}" ] && mix+=(--dev-csv "$DEV_CSV")
mkdir -p "$OUT/bench"
[ -x "$TIDINGS" ] || { echo "cpu-check: no binary at $TIDINGS (cargo build --release)" >&2; exit 1; }
if [ "$MINILM" != none ] && [ ! -d "$MINILM" ]; then
  echo "cpu-check: no topic encoder at $MINILM (models/fetch): timing the NER encoder only"
  MINILM=none
fi

flags() { grep -m1 '^flags' /proc/cpuinfo; }
has() { flags | grep -qw "$1"; }

echo "== CPU (all results in $OUT)"
{ lscpu; flags; } > "$OUT/cpu.txt" 2>&1 || true
grep -E 'Model name|^CPU\(s\)|CPU family|^Model:|L2|L3' "$OUT/cpu.txt" || true
echo "AVX-512: $(has avx512f && echo yes || echo no); AVX512-VNNI: $(has avx512_vnni && echo yes || echo no);" \
  "AVX-VNNI: $(has avx_vnni && echo yes || echo no); AMX-INT8: $(has amx_int8 && echo yes || echo no)"

echo "== the encoders against ONNX Runtime (bench/ort_encoder.py, $ROUNDS rounds)"
PYTHONUNBUFFERED=1 "$PYTHON" bench/ort_encoder.py --rounds "$ROUNDS" --threads "$THREADS" \
  --minilm "$MINILM" --tidings "$TIDINGS" ${mix[@]+"${mix[@]}"} > "$OUT/ort_encoder.txt" 2>&1 \
  || echo "bench/ort_encoder.py failed: see $OUT/ort_encoder.txt"
sed -n '/^tokens\/s, median/,$p' "$OUT/ort_encoder.txt"

# The kernels this CPU runs, by the names TIDINGS_SGEMM and TIDINGS_QGEMM take.
f32=(gemm avx2)
has avx512f && f32+=(avx512)
int8=(avx2)
has avx_vnni && int8+=(avxvnni)
if has avx512_vnni; then int8+=(avx512vnni-ymm avx512vnni); fi
has amx_int8 && int8+=(amx)

# Interleaved rounds of `tidings bench --topic-model none` (the NER encoder), one kernel
# choice at a time; the order turns round each round, so a slow minute hits every choice.
ab() {
  local var=$1 precision=$2; shift 2
  local kernels=("$@") r shape k order i log ran
  for ((r = 1; r <= ROUNDS; r++)); do
    order=("${kernels[@]}")
    if ((r % 2 == 0)); then
      order=()
      for ((i = ${#kernels[@]} - 1; i >= 0; i--)); do order+=("${kernels[i]}"); done
    fi
    for shape in "1 64" "16 64" "8 256"; do
      set -- $shape
      for k in "${order[@]}"; do
        log="$OUT/bench/$precision-$k-$1x$2-round$r.txt"
        printf 'round %s %s=%-15s %2sx%-4s ' "$r" "$var" "$k" "$1" "$2"
        if env "$var=$k" RAYON_NUM_THREADS="$THREADS" "$TIDINGS" bench --topic-model none \
          --precision "$precision" --iters 30 --batch "$1" --seq "$2" > "$log" 2>&1; then
          # The kernel that ran, as `tidings bench` names it.
          ran=$(sed -n -e "s/^Tidings $precision kernel (\([^;]*\);.*/\1/p" \
            -e "s/^Tidings $precision kernel: not used.*/gemm/p" \
            -e "s/^Tidings $precision kernel: not available.*/none/p" "$log" | head -1)
          awk -v ran="$ran" '/^ner / { print $6 " tokens/s, p50 " $4 " ms (ran: " ran ")" }' "$log"
        else
          echo "failed: see $log"
        fi
      done
    done
  done
}
echo "== f32 kernels (tokens/s of the NER encoder)"
ab TIDINGS_SGEMM f32 "${f32[@]}" | tee "$OUT/f32_kernels.txt"
echo "== int8 kernels"
ab TIDINGS_QGEMM int8 "${int8[@]}" | tee "$OUT/int8_kernels.txt"

if [ -n "$KERNELS" ] && [ -x "$KERNELS" ]; then
  echo "== cargo bench --bench kernels: each f32 tile, then each int8 kernel (its first line names both)"
  {
    for k in "${f32[@]:1}"; do
      echo "-- TIDINGS_SGEMM=$k"
      TIDINGS_SGEMM=$k RAYON_NUM_THREADS=$THREADS "$KERNELS" || echo "failed"
    done
    for k in "${int8[@]}"; do
      echo "-- TIDINGS_QGEMM=$k"
      TIDINGS_QGEMM=$k RAYON_NUM_THREADS=$THREADS "$KERNELS" || echo "failed"
    done
  } 2>&1 | tee "$OUT/kernels.txt"
else
  echo "== no kernels benchmark binary (cargo bench --bench kernels --no-run): skipped"
fi
