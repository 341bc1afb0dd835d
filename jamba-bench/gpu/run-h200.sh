#!/usr/bin/env bash
# Runs on the GPU machine, from a folder holding the stripped CUDA binaries (`jamba`,
# `jamba-bench`, and the test binaries `kernels` and `parity`), `fixtures/` and `configs/`
# (copies of ../shared). `jamba-bench/gpu/stage.sh` builds and stages all of it into .device/.
# Usage: bash run-h200.sh [tests|agree|kernels|scan|model|paper|paper-decode|all]   (default all)
set -u
OUT=${OUT:-out}
WHAT=${1:-all}
mkdir -p "$OUT"
export JAMBA_FIXTURES=$PWD/fixtures RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
nvidia-smi -q -d CLOCK | grep -A4 "Applications Clocks\|Clocks Event Reasons" | head -20
if [ "$WHAT" = tests ] || [ "$WHAT" = all ]; then
  echo "== kernel tests on CUDA (grid vs f64 loop, poisoned outputs; half inputs)"
  ./kernels --test-threads 1 2>&1 | tail -12
  echo "== parity tests on CUDA (every fixture; kernels on)"
  ./parity cuda --test-threads 1 2>&1 | tail -12
  echo "== jamba check on CUDA, f32"
  for f in fixtures/*/; do ./jamba check "$f" --backend cuda 2>&1 | grep -v "^hidden\|^router" | tail -6; done
  echo "== jamba check on CUDA, f32, at the CPU's tolerance (scale 1): the raw errors"
  for f in fixtures/*/; do ./jamba check "$f" --backend cuda --tolerance-scale 1 2>&1 | grep -E "^logits|cached|chunks|greedy|passed|failed|FAIL" | head -12; done
  echo "== jamba check on CUDA, bf16 compute"
  ./jamba check fixtures/tiny-jamba-bf16 --backend cuda --dtype bf16 2>&1 | grep -v "^hidden\|^router" | tail -6
fi
if [ "$WHAT" = agree ] || [ "$WHAT" = all ]; then
  echo "== CUDA against the CPU backend, component by component (kernels on, then off)"
  ./backends_agree cuda --test-threads 1 --nocapture > "$OUT/agree-kernels-on.log" 2>&1
  grep -E "FAIL|^test |tolerance|result" "$OUT/agree-kernels-on.log" | head -80
  JAMBA_KERNELS=off ./backends_agree cuda --test-threads 1 --nocapture > "$OUT/agree-kernels-off.log" 2>&1
  grep -E "FAIL|^test |tolerance|result" "$OUT/agree-kernels-off.log" | head -80
fi
if [ "$WHAT" = kernels ] || [ "$WHAT" = all ]; then
  echo "== kernels: fused vs tensor ops, and against mamba_ssm's table"
  ./jamba-bench kernels --backend cuda --out "$OUT/h200-kernels.json" 2>&1
fi
if [ "$WHAT" = scan ]; then
  echo "== kernels only (no tensor-op baseline), 9 repetitions"
  ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --reps 9 --out "$OUT/h200-kernels.json" 2>&1
fi
if [ "$WHAT" = model ] || [ "$WHAT" = all ]; then
  echo "== bench-jamba-1b, bf16 (kernels on)"
  ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 \
    --out "$OUT/h200-bench-jamba-1b-bf16.json" > /dev/null
  echo "== bench-jamba-1b, bf16, kernels off (JAMBA_KERNELS=off: the tensor-op path)"
  JAMBA_KERNELS=off ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 \
    --out "$OUT/h200-bench-jamba-1b-bf16-kernels-off.json" > /dev/null
fi
if [ "$WHAT" = paper ] || [ "$WHAT" = all ]; then
  echo "== the paper's comparisons: hybrid vs all attention vs all Mamba, bf16 (jamba-bench paper)"
  ./jamba-bench paper \
    --configs configs/bench-jamba-1b.config.json,configs/bench-transformer-1b.config.json,configs/bench-mamba-1b.config.json \
    --backend cuda --dtype bf16 --max-secs 120 --out "$OUT/h200-paper.json" 2>&1
fi
if [ "$WHAT" = paper-decode ]; then
  echo "== decode only (Fig. 3's question): hybrid vs all attention, bf16"
  ./jamba-bench paper \
    --configs configs/bench-jamba-1b.config.json,configs/bench-transformer-1b.config.json \
    --backend cuda --dtype bf16 --prefill 1024 --decode-warmup 8 --out "$OUT/h200-paper-decode.json" 2>&1 | tail -40
fi
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
