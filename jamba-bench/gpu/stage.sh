#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed) and stages them with the fixtures and configs in
# .device/ (ignored by git), ready to be carried to the GPU machine:
#   bash jamba-bench/gpu/stage.sh
#   then on the GPU machine, from the repository root:
#   cd .device && for f in *.xz; do xz -dk "$f"; done && chmod +x * ; bash run-h200.sh all
set -eu
cd "$(dirname "$0")/../.."
export CUDARC_CUDA_VERSION=13000
cargo build --release --features cuda -p jamba-cli -p jamba-bench --target-dir target-cuda
cargo test --release --features cuda --no-run --test kernels --test parity --test backends_agree --target-dir target-cuda
mkdir -p .device
rm -f .device/*.xz
for bin in jamba jamba-bench; do
  strip -o ".device/$bin" "target-cuda/release/$bin"
done
for t in kernels parity backends_agree; do
  exe=$(ls -t target-cuda/release/deps/$t-* | grep -v '\.d$' | head -1)
  strip -o ".device/$t" "$exe"
done
# With AUTOTUNE=1, also a `jamba-bench-at` built with Burn's autotune (for `run-h200.sh autotune-decode`).
if [ "${AUTOTUNE:-0}" = 1 ]; then
  cargo build --release --features cuda,autotune -p jamba-bench --target-dir target-cuda-at
  strip -o .device/jamba-bench-at target-cuda-at/release/jamba-bench
fi
(cd .device && for f in jamba jamba-bench jamba-bench-at kernels parity backends_agree; do if [ -f "$f" ]; then xz -T2 -6 -f "$f"; fi; done)
rm -rf .device/fixtures .device/configs
cp -r ../shared/fixtures ../shared/configs .device/
cp jamba-bench/gpu/run-h200.sh jamba-bench/gpu/ncu_summary.py jamba-bench/gpu/ncu_rows.py jamba-bench/gpu/kernel_sass.py jamba-bench/gpu/exp_forms.cu .device/
du -sh .device
