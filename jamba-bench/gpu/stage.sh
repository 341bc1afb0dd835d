#!/usr/bin/env bash
# Builds the CUDA binaries and test binaries here (no GPU needed) and stages them with the
# fixtures and configs in .device/ (ignored by git), to be carried to the GPU machine:
#   bash jamba-bench/gpu/stage.sh
#   then on the GPU machine, from the repository root: bash .device/run.sh tests|bench|paper
# Put a previous build's stripped `jamba-bench` in .device/old/ to compare against it (`bench`).
set -eu
cd "$(dirname "$0")/../.."
export CUDARC_CUDA_VERSION=13000
T=target-cuda
cargo build --release --features cuda -p jamba-cli -p jamba-bench --target-dir $T
cargo test --release -p jamba-kernels --features cuda --no-run --target-dir $T
cargo test --release -p jamba --features cuda,flex --no-run --target-dir $T \
  --test parity --test engine_ops --test backends_agree
mkdir -p .device/bin
rm -f .device/bin/*
for bin in jamba jamba-bench; do
  strip -o ".device/bin/$bin" "$T/release/$bin"
done
for t in scan conv norm gemv attention moe mlp argmax activation matmul mamba_step parity engine_ops backends_agree; do
  exe=$(ls -t $T/release/deps/$t-* | grep -v '\.d$' | head -1)
  strip -o ".device/bin/test-$t" "$exe"
done
(cd .device/bin && for f in *; do xz -T2 -6 -f "$f"; done)
rm -rf .device/fixtures .device/configs
cp -r ../shared/fixtures ../shared/configs .device/
cp jamba-bench/gpu/run.sh jamba-bench/gpu/ncu_summary.py .device/
du -sh .device
