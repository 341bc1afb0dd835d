#!/usr/bin/env bash
# Runs on the GPU machine, from a folder holding the stripped `jamba` and `jamba-bench` CUDA
# binaries, `fixtures/` and `configs/` (copies of ../shared). Build them here with
#   CUDARC_CUDA_VERSION=13000 cargo build --release --features cuda -p jamba-cli -p jamba-bench
# then copy them (stripped; xz them to fit the 64 MiB transfer) with ../shared/{fixtures,configs}.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
if [ -x ./backend_probe ]; then echo "== stage-by-stage probe"; ./backend_probe cuda fixtures/tiny-jamba | tail -4; fi
echo "== parity on CUDA, f32"
for f in fixtures/*/; do ./jamba check "$f" --backend cuda 2>&1 | grep -v "^hidden\|^router" ; done
echo "== parity on CUDA, bf16 compute"
./jamba check fixtures/tiny-jamba-bf16 --backend cuda --dtype bf16 2>&1 | grep -v "^hidden\|^router"
echo "== bench-jamba-1b, bf16"
./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
  --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 \
  --out "$OUT/h200-bench-jamba-1b-bf16.json" > /dev/null
nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv
