#!/usr/bin/env bash
# Packs this machine's `perf` and the libraries it needs (not libc/libm/libstdc++/libgcc/libz,
# which the GPU machine has) into .device/perfkit.tar.xz, for `run-h200.sh host`: the GPU
# machine has no perf of its own. Also stages the CUDA bench with its symbols as
# .device/jamba-bench-sym.xz (stage.sh strips the others).
set -eu
cd "$(dirname "$0")/../.."
kit=$(mktemp -d)/perfkit
mkdir -p "$kit/lib"
cp "$(command -v perf)" "$kit/"
for l in $(ldd "$(command -v perf)" | awk '/=>/{print $3}'); do
  case $(basename "$l") in
    libc.so.6|libm.so.6|libstdc++.so.6|libgcc_s.so.1|libz.so.1) ;;
    *) cp -L "$l" "$kit/lib/" ;;
  esac
done
tar cJf .device/perfkit.tar.xz -C "$(dirname "$kit")" perfkit
cp target-cuda/release/jamba-bench .device/jamba-bench-sym
xz -T2 -6 -f .device/jamba-bench-sym
du -sh .device
