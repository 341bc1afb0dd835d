#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .device/ staged by stage.sh:
#   bash .device/run.sh tests   every kernel, engine and parity test on CUDA, and `jamba check`
#   bash .device/run.sh bench   the standard benchmark, this build against .device/old's, alternated
#   bash .device/run.sh paper   hybrid vs all-attention vs all-Mamba (jamba-bench paper)
#   bash .device/run.sh ncu     device time per kernel of a decoding step and of a prefill
# Results go to $OUT (the device tool's output folder) or ./out.
set -u
cd "$(dirname "$0")"
OUT=${OUT:-out}
mkdir -p "$OUT"
for f in bin/*.xz old/*.xz; do [ -f "$f" ] && xz -dkf "$f" && chmod +x "${f%.xz}"; done
export JAMBA_FIXTURES=$PWD/fixtures RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv,noheader
# The standard command: bf16 prefill of 512 and 2048 tokens, decode at batch 1 and 16 after 512.
standard() {
  "$1" throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 \
    --warmup 1 --out "$OUT/h200-bench-jamba-1b-bf16-$2.json" 2>&1 >/dev/null | grep -E "^(prefill|decode)" | sed "s/^/$2  /"
}
case "${1:-tests}" in
tests)
  for t in scan conv norm gemv attention moe mlp argmax activation matmul mamba_step; do
    echo "== jamba-kernels: $t"
    ./bin/test-$t --test-threads 1 2>&1 | grep -E "^test |test result" | tail -12
  done
  for t in engine_ops backends_agree parity; do
    echo "== jamba: $t"
    ./bin/test-$t cuda --test-threads 1 2>&1 | tee "$OUT/test-$t.log" | grep -E "^test |test result|FAIL" | tail -20
  done
  echo "== jamba check, f32 and bf16"
  for f in fixtures/*/; do ./bin/jamba check "$f" --backend cuda 2>&1 | tail -1 | sed "s|^|$f f32: |"; done
  ./bin/jamba check fixtures/tiny-jamba-bf16 --backend cuda --dtype bf16 2>&1 | tail -1 | sed "s|^|bf16: |"
  ;;
bench)
  for round in 1 2; do
    standard ./old/jamba-bench "old-$round"
    standard ./bin/jamba-bench "new-$round"
  done
  ;;
paper)
  for c in jamba transformer mamba; do
    ./bin/jamba-bench paper --configs configs/bench-$c-1b.config.json --backend cuda --dtype bf16 \
      --out "$OUT/h200-paper-$c.json" 2>&1 | grep -vE "^\s*$" | tail -25
  done
  ;;
ncu)
  M="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
  A="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1 --reps 1"
  $M --log-file "$OUT/ncu-step-1.csv" ./bin/jamba-bench $A --prefill 0 --decode-context 512 --decode-batch 1 --decode-steps 4 >/dev/null 2>&1
  $M --log-file "$OUT/ncu-step-2.csv" ./bin/jamba-bench $A --prefill 0 --decode-context 512 --decode-batch 1 --decode-steps 12 >/dev/null 2>&1
  python3 ncu_summary.py "$OUT/ncu-step-2.csv" --minus "$OUT/ncu-step-1.csv" --top 16
  ;;
esac
