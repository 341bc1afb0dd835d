#!/usr/bin/env bash
# Runs on the GPU machine, from a folder holding the stripped CUDA binaries (`jamba`,
# `jamba-bench`, and the test binaries `kernels` and `parity`), `fixtures/` and `configs/`
# (copies of ../shared). `jamba-bench/gpu/stage.sh` builds and stages all of it into .device/.
# Usage: bash run-h200.sh [tests|agree|kernels|scan|sweep|scan-variants|scan-ftz|autotune-decode|scan-sass|prefill-tma|decode-variants|fused-step|switches|decode-kernels|vec|strided|exclusive|one|fold|prefill-where|prefill2|s21-tests|s21|s21-host2|host|host-prefill|mmprobe|scan-stalls|step|routed|ncu|ncu-prefill|ncu-model|model|matmul|profile|paper|paper-decode|all]
#   (default all; sweep and ncu are tuning runs: the scan kernels' variants, ncu's device times)
set -u
OUT=${OUT:-out}
WHAT=${1:-all}
mkdir -p "$OUT"
export JAMBA_FIXTURES=$PWD/fixtures RUST_BACKTRACE=1
# bf16 decode throughput of bench-jamba-1b after a 512-token prompt: `decode_bench BIN LABEL`,
# batches from $BATCHES (default 1,16); prints the decode lines, each prefixed with LABEL.
decode_bench() {
  "$1" throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 0 --decode-batch ${BATCHES:-1,16} --decode-context 512 --decode-steps 64 --reps 3 --warmup 1 \
    2>&1 >/dev/null | grep -E "^decode" | sed "s/^/$2  /"
}
# ncu's device time per kernel of a b1 bf16 step of ./jamba-bench (12 minus 4 steps), its CSVs
# kept as $OUT/ncu-TAG-*.csv.xz: `ncu_step TAG`.
ncu_step() {
  local A="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1 --reps 1 --prefill 0 --decode-context 512 --decode-batch 1"
  local M="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
  $M --log-file "$OUT/ncu-$1-1.csv" ./jamba-bench $A --decode-steps 4 > /dev/null 2>&1
  $M --log-file "$OUT/ncu-$1-2.csv" ./jamba-bench $A --decode-steps 12 > /dev/null 2>&1
  python3 ncu_summary.py "$OUT/ncu-$1-2.csv" --minus "$OUT/ncu-$1-1.csv" --top 16
  python3 ncu_rows.py "$OUT/ncu-$1-2.csv" --top 16
  (cd "$OUT" && xz -6 ncu-$1-*.csv)
}
# The standard command of RESULTS.md (bf16 prefill 512 and 2048, decode b1 and b16 after 512),
# its rows kept as $OUT/h200-bench-jamba-1b-bf16SUFFIX.json: `standard_command SUFFIX`.
standard_command() {
  ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 \
    --out "$OUT/h200-bench-jamba-1b-bf16$1.json" 2>&1 >/dev/null | grep -E "^(prefill|decode)"
}
# ncu's device time per kernel of one steady-state 2048-token prefill of ./jamba-bench (a second
# repetition minus the first), the top N kernels: `ncu_prefill N`; CSVs kept as $OUT/ncu-*.csv.xz.
ncu_prefill() {
  echo "== ncu: device time of every kernel of a 2048-token prefill"
  local B="./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1"
  local M="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
  $M --log-file "$OUT/ncu-prefill-1.csv" $B --reps 1 --prefill 2048 --decode-steps 0 > /dev/null 2>&1
  $M --log-file "$OUT/ncu-prefill-2.csv" $B --reps 2 --prefill 2048 --decode-steps 0 > /dev/null 2>&1
  python3 ncu_summary.py "$OUT/ncu-prefill-2.csv" --minus "$OUT/ncu-prefill-1.csv" --top "$1"
  (cd "$OUT" && xz -6 ncu-*.csv)
}
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
if [ "$WHAT" = sweep ]; then
  echo "== scan kernels: tiled vs chunked, and the chunked kernel's chunk count"
  JAMBA_SCAN_KERNEL=tiled ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan,update \
    --reps 7 --out "$OUT/sweep-tiled.json" 2>&1 | sed 's/^/tiled   /'
  ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan,update --reps 7 \
    --out "$OUT/sweep-default.json" 2>&1 | sed 's/^/default /'
  for k in ${CHUNKS:-1 8 16 32 64 128}; do
    JAMBA_SCAN_CHUNKS=$k ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan --reps 5 \
      2>&1 | sed "s/^/K=$k  /"
  done
  for cube in 64 256; do
    JAMBA_SCAN_CUBE=$cube ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan,update --reps 5 \
      2>&1 | sed "s/^/cube=$cube  /"
  done
  for tile in 8 64; do
    JAMBA_SCAN_BC_TILE=$tile ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan --reps 5 \
      2>&1 | sed "s/^/tile=$tile  /"
  done
fi
if [ "$WHAT" = mmprobe ]; then
  echo "== which matmul kernels run: 2048x1024x4096 in isolation (Burn's own matmul first) vs a 2048-token prefill"
  M="ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active --csv"
  $M --launch-count 12 --log-file "$OUT/mm-iso.csv" ./jamba-bench matmul --backend cuda --dtype bf16 \
    --shapes 2048x1024x4096 --calls 2 > "$OUT/mm-iso.txt" 2>&1
  python3 ncu_rows.py "$OUT/mm-iso.csv" --top 8
  M="ncu --clock-control none --metrics gpu__time_duration.sum,launch__registers_per_thread --csv"
  $M --kernel-name regex:matmul --log-file "$OUT/mm-model.csv" ./jamba-bench throughput \
    --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1 --reps 1 \
    --prefill 2048 --decode-steps 0 > /dev/null 2>&1
  python3 ncu_rows.py "$OUT/mm-model.csv" --top 25
  (cd "$OUT" && xz -6 mm-*.csv)
fi
if [ "$WHAT" = scan-variants ]; then
  echo "== chunked scan: steps per prefetch group (JAMBA_SCAN_GROUP) x the 2^v form of the decay (JAMBA_SCAN_EXP2)"
  for g in ${GROUPS_:-1 2 4 8}; do
    for e in ${EXP2S:-0 1}; do
      JAMBA_SCAN_GROUP=$g JAMBA_SCAN_EXP2=$e ./jamba-bench kernels --backend cuda \
        --tensor-ops-max 0 --ops scan --reps 5 2>&1 | grep -E "^scan" | sed "s/^/g=$g e=$e  /"
    done
  done
  echo "== the CUDA scan kernel tests (f32 grid, strided views, half inputs) for the variant in TEST_VARIANT (group exp2)"
  set -- ${TEST_VARIANT:-4 1}
  JAMBA_SCAN_GROUP=$1 JAMBA_SCAN_EXP2=$2 timeout ${TEST_SECS:-150} ./kernels --test-threads 1 scan_kernel 2>&1 \
    | grep -E "^test |panicked|rel. error" | sed "s/^/g=$1 e=$2  /" | head -8
fi
if [ "$WHAT" = scan-ftz ]; then
  # Needs `jamba-bench-prev`, the previous build's bench (its `kernels` numbers, in the same run).
  echo "== the CUDA kernel tests with the default (flush-to-zero ex2) scan, then the parity tests"
  timeout ${TEST_SECS:-300} ./kernels --test-threads 1 2>&1 | grep -E "^test |panicked|test result" | head -24
  ./parity cuda --test-threads 1 2>&1 | grep -E "test result|FAIL|panicked" | head -6
  echo "== scan and state update: previous build, then JAMBA_SCAN_EXP2=1 (__powf), then the default (2: ftz ex2), twice"
  for round in 1 2; do
    for v in prev 1 2; do
      if [ "$v" = prev ]; then bin=./jamba-bench-prev; e=1; else bin=./jamba-bench; e=$v; fi
      [ -x "$bin" ] || continue
      JAMBA_SCAN_EXP2=$e $bin kernels --backend cuda --tensor-ops-max 0 --ops scan,update --reps 7 2>&1 \
        | grep -E "^(scan|state)" | sed "s/^/r$round $v  /"
    done
  done
  echo "== the default scan's chunk count at the two shorter shapes (JAMBA_SCAN_CHUNKS; default 16 at both)"
  for k in ${CHUNKS_:-8 12 16 24 32}; do
    JAMBA_SCAN_CHUNKS=$k ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops scan --dtypes bf16 \
      --shapes 1x8192x4096,4x2048x1024 --reps 7 2>&1 | grep -E "^scan" | sed "s/^/chunks=$k  /"
  done
  # The default kernel's SASS: `SASS_VARIANTS="4 2" bash run-h200.sh scan-sass`.
fi
if [ "$WHAT" = autotune-decode ]; then
  # Needs `jamba-bench-at`, built with `--features cuda,autotune`. Each tuning Burn runs is logged
  # with a timestamp: which operations retune while decoding, and how long the tuning takes.
  echo "== decoding under Burn's autotune: what is tuned, and when (b1, then b16, context 512)"
  printf '[autotune.logger]\nlevel = "minimal"\nstderr = true\n' > cubecl.toml
  for b in ${AT_BATCHES:-1 16}; do
    timeout ${AT_SECS:-240} ./jamba-bench-at throughput --config configs/bench-jamba-1b.config.json --backend cuda \
      --dtype bf16 --prefill 0 --decode-batch $b --decode-context 512 --decode-steps 32 --reps 2 --warmup 1 2>&1 \
      | while IFS= read -r line; do printf '%s %s\n' "$(date +%T)" "$line"; done > "$OUT/at-decode-b$b.log"
    echo "-- b$b: $(grep -c 'Fastest result' "$OUT/at-decode-b$b.log") tunings; the last lines:"
    grep -v "Top 3 times" "$OUT/at-decode-b$b.log" | cut -c1-220 | tail -6
    grep "Fastest result" "$OUT/at-decode-b$b.log" | sed 's/Fastest result //' | cut -c1-200 | head -40
  done
  rm -f cubecl.toml
fi
if [ "$WHAT" = scan-sass ]; then
  echo "== the exponential forms CubeCL can emit, as NVRTC compiles them (SASS)"
  NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
  $NVCC -arch=sm_90a -cubin -o "$OUT/exp_forms.cubin" exp_forms.cu && \
    $(dirname $NVCC)/cuobjdump -sass "$OUT/exp_forms.cubin" | grep -E "Function|MUFU|FMUL|FFMA|FADD|FSETP|FSEL|FMNMX" | sed 's/^ *//' | cut -c1-90
  rm -f "$OUT/exp_forms.cubin"
  echo "== the chunked scan's instruction mix (bf16, (1, 8192, 4096)), per variant in SASS_VARIANTS (group exp2)"
  echo "${SASS_VARIANTS:-4 0,4 1}" | tr , '\n' | while read -r g e; do
    rm -f "$OUT/src.log"
    JAMBA_SCAN_GROUP=$g JAMBA_SCAN_EXP2=$e CUBECL_DEBUG_LOG="$OUT/src.log" ./jamba-bench kernels \
      --backend cuda --dtypes bf16 --shapes 1x8192x4096 --ops scan --tensor-ops-max 0 --reps 1 --min-ms 0 > /dev/null 2>&1
    echo "-- group $g, exp2 $e"
    python3 kernel_sass.py "$OUT/src.log" scan_chunk_kernel --nvcc $NVCC --dump "$OUT/sass-g$g-e$e"
  done
  rm -f "$OUT/src.log"
fi
if [ "$WHAT" = prefill-tma ]; then
  echo "== bench-jamba-1b bf16: cubek's TMA kernel for the half-precision products (default), then Burn's matmul (JAMBA_TMA_MATMUL=0, prefill only)"
  ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 \
    --out "$OUT/h200-bench-jamba-1b-bf16.json" 2>&1 >/dev/null | grep -E "^(prefill|decode)" | sed "s/^/tma=1  /"
  JAMBA_TMA_MATMUL=0 ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --prefill 512,2048 --decode-steps 0 --reps 3 --warmup 1 2>&1 >/dev/null | grep -E "^(prefill|decode)" | sed "s/^/tma=0  /"
fi
if [ "$WHAT" = decode-variants ]; then
  echo "== bf16 decoding, b1, context 512: the default build against this session's switches turned off"
  for v in "JAMBA_NONE=0" "JAMBA_TMA_MATMUL=0" "JAMBA_SCAN_GROUP=1 JAMBA_SCAN_EXP2=0" "JAMBA_NONE=1"; do
    env $v ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
      --prefill 0 --decode-batch 1 --decode-context 512 --decode-steps 32 --reps 3 --warmup 1 2>&1 >/dev/null \
      | grep "^decode" | sed "s/^/[$v]  /"
  done
fi
if [ "$WHAT" = host ]; then
  # Where a decoding step's host time goes. Needs `perfkit.tar.xz` (perf and its libraries,
  # `jamba-bench/gpu/perfkit.sh`) and `jamba-bench-sym` (the bench with its symbols) beside this.
  echo "== profile: whole step, normal and on CubeCL's device thread (JambaBackend::exclusive)"
  ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --batch 1 --context 512 --steps 50 2>&1 | grep -v "^layer"
  echo "== throughput, JAMBA_EXCLUSIVE on/off alternated"
  for round in 1 2; do
    for v in on off; do
      JAMBA_EXCLUSIVE=$v ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda \
        --dtype bf16 --prefill 0 --decode-batch 1,16 --decode-context 512 --decode-steps 64 --reps 3 --warmup 1 \
        2>&1 >/dev/null | grep "^decode" | sed "s/^/r$round exclusive=$v  /"
    done
  done
  if [ -f perfkit.tar.xz ] && [ -f jamba-bench-sym ]; then
    tar xJf perfkit.tar.xz
    for v in off on; do
      echo "== perf, decode b1 bf16, JAMBA_EXCLUSIVE=$v"
      JAMBA_EXCLUSIVE=$v LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf record -F 4999 -o perf-$v.data \
        ./jamba-bench-sym throughput --config configs/bench-jamba-1b.config.json --backend cuda \
        --dtype bf16 --prefill 0 --decode-batch 1 --decode-context 512 --decode-steps 256 --reps 3 --warmup 1 \
        2>&1 >/dev/null | grep "^decode"
      LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf report -i perf-$v.data --sort comm --stdio 2>/dev/null \
        | grep -v "^#" | grep . | head -8
      LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf report -i perf-$v.data --sort comm,dso,sym --stdio 2>/dev/null \
        > "$OUT/perf-$v.txt"
      grep -v "^#" "$OUT/perf-$v.txt" | grep . | head -60 | cut -c1-200
    done
  fi
fi
if [ "$WHAT" = host-prefill ]; then
  # Where a 2048-token prefill's host time goes (wall ~2x its device time): perf on the bench
  # with its symbols, flat by thread and symbol, then with DWARF call stacks (children) for
  # the model's thread. Needs `perfkit.tar.xz` and `jamba-bench-sym` (perfkit.sh) beside this.
  tar xJf perfkit.tar.xz
  P="LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf"
  A="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --prefill 2048 --decode-steps 0"
  echo "== perf, flat, prefill 2048 x 30"
  env LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf record -F 4999 -o perf-p.data \
    ./jamba-bench-sym $A --reps 30 --warmup 2 2>&1 >/dev/null | grep "^prefill"
  env LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf report -i perf-p.data --sort comm --stdio 2>/dev/null | grep -v "^#" | grep . | head -8
  env LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf report -i perf-p.data --sort comm,dso,sym --stdio 2>/dev/null > "$OUT/perf-prefill-flat.txt"
  grep -v "^#" "$OUT/perf-prefill-flat.txt" | grep . | head -70 | cut -c1-220
  echo "== perf, call stacks (dwarf), prefill 2048 x 8"
  env LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf record -F 499 --call-graph dwarf,16384 -o perf-g.data \
    ./jamba-bench-sym $A --reps 8 --warmup 1 2>&1 >/dev/null | grep "^prefill"
  env LD_LIBRARY_PATH=$PWD/perfkit/lib ./perfkit/perf report -i perf-g.data --children --sort comm,sym --stdio --no-demangle -g none --percent-limit 1.5 2>/dev/null > "$OUT/perf-prefill-children.txt"
  grep -v "^#" "$OUT/perf-prefill-children.txt" | grep . | head -120 | cut -c1-240
  (cd "$OUT" && xz -6 perf-prefill-*.txt)
fi
if [ "$WHAT" = fused-step ]; then
  echo "== decoding with the fused Mamba step (default) and without (JAMBA_FUSED_STEP=off), alternated, bf16 then f32"
  for dt in bf16 f32; do
    for round in 1 2; do
      for v in on off; do
        JAMBA_FUSED_STEP=$v ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda \
          --dtype $dt --prefill 0 --decode-batch 1,16 --decode-context 512 --decode-steps 64 --reps 3 --warmup 1 \
          2>&1 >/dev/null | grep "^decode" | sed "s/^/$dt r$round fused=$v  /"
      done
    done
  done
  echo "== the fused step's kernel tests (f32, bf16, f16), then every kernel test and the parity tests"
  timeout ${TEST_SECS:-300} ./kernels --test-threads 1 2>&1 | grep -E "^test |panicked|rel. error|test result" | head -40
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
fi
if [ "$WHAT" = switches ]; then
  # Session 14's three decoding switches, each alone and all together, against the defaults;
  # the combinations alternated, two rounds, in one run.
  echo "== bf16 decoding, b1 and b16 after 512: JAMBA_FUSED_ATTENTION, JAMBA_GEMV, JAMBA_EXCLUSIVE"
  for round in 1 2; do
    for v in "JAMBA_NONE=0" "JAMBA_FUSED_ATTENTION=on" "JAMBA_GEMV=single" "JAMBA_EXCLUSIVE=on" \
        "JAMBA_FUSED_ATTENTION=on JAMBA_GEMV=single" \
        "JAMBA_FUSED_ATTENTION=on JAMBA_GEMV=single JAMBA_EXCLUSIVE=on"; do
      env $v ./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda \
        --dtype bf16 --prefill 0 --decode-batch 1,16 --decode-context 512 --decode-steps 64 --reps 3 --warmup 1 \
        2>&1 >/dev/null | grep "^decode" | sed "s/^/r$round [$v]  /"
    done
  done
  echo "== kernel tests, then the parity tests with the defaults and with every switch on"
  timeout ${TEST_SECS:-300} ./kernels --test-threads 1 2>&1 | grep -E "^test |panicked|test result" | head -40
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
  JAMBA_FUSED_ATTENTION=on JAMBA_GEMV=single JAMBA_EXCLUSIVE=on ./parity cuda --test-threads 1 2>&1 \
    | grep -E "^test |test result|FAIL|panicked" | sed "s/^/switches on  /" | head -12
fi
if [ "$WHAT" = decode-kernels ]; then
  # Needs `jamba-bench-prev`, the previous build's bench: the two alternated in one run, then
  # ncu's device time of every kernel of a b1 step, then the tests.
  echo "== bf16, prefill 512/2048, decode b1/b16 after 512: previous build, then this one, alternated"
  for round in 1 2; do
    for bin in ./jamba-bench-prev ./jamba-bench; do
      [ -x "$bin" ] || continue
      $bin throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
        --prefill 512,2048 --decode-batch 1,16 --decode-context 512 --decode-steps 64 --reps 3 --warmup 1 \
        --out "$OUT/h200-bench-jamba-1b-bf16-$(basename $bin)-r$round.json" 2>&1 >/dev/null \
        | grep -E "^(prefill|decode)" | sed "s/^/r$round $(basename $bin)  /"
    done
  done
  echo "== ncu: device time per kernel of a b1 decoding step (8 steps of the difference, twice: warmup and run), each build"
  A="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1 --reps 1 --prefill 0 --decode-context 512"
  M="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
  for bin in ./jamba-bench-prev ./jamba-bench; do
    [ -x "$bin" ] || continue
    n=$(basename $bin)
    $M --log-file "$OUT/ncu-$n-1.csv" $bin $A --decode-steps 4 > /dev/null 2>&1
    $M --log-file "$OUT/ncu-$n-2.csv" $bin $A --decode-steps 12 > /dev/null 2>&1
    echo "-- $n"
    python3 ncu_summary.py "$OUT/ncu-$n-2.csv" --minus "$OUT/ncu-$n-1.csv" --top 16
  done
  (cd "$OUT" && tar cJf ncu-decode.tar.xz ncu-*.csv && rm ncu-*.csv)
  echo "== profile, b1 and b16"
  for b in 1 16; do
    ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
      --batch $b --context 512 --steps 50 2>&1 | grep -E "whole step|final norm|argmax|element-wise"
  done
  echo "== kernel tests, parity tests"
  timeout ${TEST_SECS:-300} ./kernels --test-threads 1 2>&1 | grep -E "^test |panicked|test result" | head -40
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
fi
if [ "$WHAT" = vec ]; then
  # Session 17: the vector GEMV (16-byte weight loads, Array arguments) against the scalar one
  # (JAMBA_GEMV_VEC=off) in one binary, its unroll depth, the launch-cost probe, ncu of a step.
  echo "== kernel tests on CUDA matching: ${TESTS:-gemv}"
  timeout ${TEST_SECS:-240} ./kernels --test-threads 1 ${TESTS:-gemv} 2>&1 | grep -E "^test |panicked|test result|rel. error|left|right" | head -40
  if [ "${PROBE:-1}" = 1 ]; then
    echo "== what a launch costs the host (µs): tensors vs arrays, output reused vs fresh"
    ./jamba-bench launch --backend cuda --launches 20000 --rounds 2 2>&1
  fi
  echo "== bf16 decode after 512: vector GEMV off/on (unroll 4), alternated, two rounds"
  for round in 1 2; do
    JAMBA_GEMV_VEC=off decode_bench ./jamba-bench "r$round vec=off"
    decode_bench ./jamba-bench "r$round vec=on "
  done
  echo "== b1 with unroll ${UNROLLS:-2 8}"
  for un in ${UNROLLS:-2 8}; do BATCHES=1 JAMBA_GEMV_UNROLL=$un decode_bench ./jamba-bench "unroll=$un"; done
  echo "== ncu: device time per kernel of a b1 step (12 minus 4 steps), vector GEMV on"
  ncu_step vec
  echo "== parity on CUDA"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
fi
if [ "$WHAT" = strided ]; then
  # Session 17's last build: the vector GEMV and expert MLPs, the decode kernels' buffers as
  # `Strided` (Array + scalar strides) arguments. Needs `jamba-bench-prev` (the previous build).
  echo "== kernel tests on CUDA matching: ${TESTS:-mamba attention argmax normed}"
  timeout ${TEST_SECS:-200} ./kernels --test-threads 1 ${TESTS:-mamba attention argmax normed} 2>&1 | grep -E "^test |panicked|test result" | head -30
  echo "== parity on CUDA"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
  echo "== what a launch costs the host (µs)"
  ./jamba-bench launch --backend cuda --launches 20000 --rounds 1 2>&1
  echo "== bf16 decode after 512: previous build, then this one, alternated, two rounds"
  for round in 1 2; do
    for bin in ./jamba-bench-prev ./jamba-bench; do
      [ -x "$bin" ] || continue
      decode_bench $bin "r$round $(basename $bin)"
    done
  done
  echo "== b1 with at most ${UNITS_:-256 512} units per vector-form cube"
  for un in ${UNITS_:-256 512}; do
    BATCHES=1 JAMBA_VEC_UNITS=$un decode_bench ./jamba-bench "units=$un"
  done
  echo "== profile b1: a step issued vs finished"
  ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --batch 1 --context 512 --steps 50 2>&1 | grep -E "whole step|final norm|argmax|layer 0|layer 1 "
  echo "== ncu: device time per kernel of a b1 step (12 minus 4 steps)"
  ncu_step str
fi
if [ "$WHAT" = exclusive ]; then
  # Session 17: a step issued from CubeCL's device thread (JAMBA_EXCLUSIVE=on) against the
  # caller's thread, now that the decode kernels take Array arguments; 512-unit vector cubes.
  echo "== bf16 decode b1 after 512, JAMBA_EXCLUSIVE off/on alternated, two rounds; then b16 on"
  for round in 1 2; do
    for ex in off on; do
      BATCHES=1 JAMBA_VEC_UNITS=512 JAMBA_EXCLUSIVE=$ex decode_bench ./jamba-bench "r$round exclusive=$ex"
    done
  done
  BATCHES=16 JAMBA_VEC_UNITS=512 JAMBA_EXCLUSIVE=on decode_bench ./jamba-bench "exclusive=on"
fi
if [ "$WHAT" = one ]; then
  # Session 18: the Mamba step in one launch and the vector decode attention, against the
  # two-launch step and the scalar attention (JAMBA_MAMBA_ONE=off, JAMBA_ATTN_VEC=off).
  echo "== kernel tests on CUDA: the Mamba step and the decode attention (f32, then half)"
  ./kernels --test-threads 1 mamba_step attention 2>&1 | grep -E "^test |test result|FAIL|panicked|worst|form" | head -20
  echo "== bf16 decode after 512: the new kernels off/on, alternated, two rounds"
  for round in 1 2; do
    JAMBA_MAMBA_ONE=off JAMBA_ATTN_VEC=off decode_bench ./jamba-bench "r$round old"
    decode_bench ./jamba-bench "r$round new"
  done
  echo "== b1 with one of them"
  BATCHES=1 JAMBA_ATTN_VEC=off decode_bench ./jamba-bench "Mamba one-launch only"
  BATCHES=1 JAMBA_MAMBA_ONE=off decode_bench ./jamba-bench "vector attention only"
  echo "== ncu: device time per kernel of a b1 step (12 minus 4 steps), new kernels"
  ncu_step one
  echo "== profile b1: a step issued vs finished"
  ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
    --batch 1 --context 512 --steps 50 2>&1 | grep -E "whole step|final norm|argmax|layer 0|layer 1 "
  echo "== registers, spills and instruction mix of the decode kernels (ptxas -v, SASS)"
  JAMBA_MAMBA_ONE=off CUBECL_DEBUG_LOG="$OUT/src-old.log" ./jamba-bench throughput --config configs/bench-jamba-1b.config.json \
    --backend cuda --dtype bf16 --prefill 0 --decode-batch 1 --decode-context 16 --decode-steps 2 --reps 1 --warmup 0 > /dev/null 2>&1
  CUBECL_DEBUG_LOG="$OUT/src.log" ./jamba-bench throughput --config configs/bench-jamba-1b.config.json \
    --backend cuda --dtype bf16 --prefill 0 --decode-batch 1 --decode-context 16 --decode-steps 2 --reps 1 --warmup 0 > /dev/null 2>&1
  for k in mamba_step_one expert_gate_up_vec expert_down_vec gemv_vec decode_attention_vec route_normed; do
    python3 kernel_sass.py "$OUT/src.log" $k --top 12 --dump "$OUT/sass-$k" 2>&1 | head -12
  done
  python3 kernel_sass.py "$OUT/src-old.log" mamba_step_front --top 12 2>&1 | head -8
  rm -f "$OUT"/src*.log
  echo "== parity on CUDA"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
fi
if [ "$WHAT" = fold ]; then
  # Session 20: the dense MLP's norm folded into its gate/up launch and the q/k/v projections
  # in one launch, against the separate launches (JAMBA_MLP_NORMED=off JAMBA_QKV_ONE=off).
  echo "== kernel tests on CUDA: the folded MLP norm, the q/k/v launch (f32, then half)"
  ./kernels --test-threads 1 normed mlp 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -20
  echo "== bf16 decode after 512: the folds off/on, alternated, two rounds"
  for round in 1 2; do
    JAMBA_MLP_NORMED=off JAMBA_QKV_ONE=off decode_bench ./jamba-bench "r$round old"
    decode_bench ./jamba-bench "r$round new"
  done
  echo "== ncu: device time per kernel of a b1 step (12 minus 4 steps), folds on"
  ncu_step fold
  echo "== parity on CUDA"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
fi
if [ "$WHAT" = prefill-where ]; then
  # Where a 2048-token prefill goes: the standard command twice, then ncu's device time per
  # kernel of one steady-state prefill (a second repetition minus the first), set against the
  # wall-clock time the bench reports.
  for round in 1 2; do
    echo "== the standard command, round $round"
    standard_command "-r$round"
  done
  ncu_prefill 20
fi
if [ "$WHAT" = prefill2 ]; then
  # Session 20, second build: the SwiGLU gate in one launch, against Burn's silu and product
  # (JAMBA_SILU_MUL=off). (The session's run also timed cubek's flash attention, switched by
  # JAMBA_FLASH_ATTENTION; it refused every shape and was taken out: RESULTS.md, session 20.)
  echo "== kernel tests on CUDA: silu_mul, the folded MLP norm, q/k/v (f32, half)"
  ./kernels --test-threads 1 silu mlp normed 2>&1 | grep -E "^test |test result|FAIL|panicked|rel. error" | head -24
  echo "== parity on CUDA (every fixture; kernels on)"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
  P="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --decode-steps 0 --reps 5 --warmup 2"
  for round in 1 2; do
    echo "== prefill, round $round: default / silu_mul off"
    ./jamba-bench $P --prefill 512,2048 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/default   /"
    JAMBA_SILU_MUL=off ./jamba-bench $P --prefill 512,2048 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/silu off  /"
  done
  echo "== the standard command"
  standard_command ""
  ncu_prefill 16
fi
if [ "$WHAT" = s21-tests ]; then
  # Session 21: every kernel test (the new route, scan-parameter and conv ones included) and
  # parity (greedy generation now queues each step before reading the last one's tokens).
  echo "== kernel tests on CUDA (all)"
  ./kernels --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked|rel. error" | head -60
  echo "== parity on CUDA (every fixture; kernels on)"
  ./parity cuda --test-threads 1 2>&1 | grep -E "^test |test result|FAIL|panicked" | head -12
  echo "== jamba check on CUDA, bf16 compute"
  ./jamba check fixtures/tiny-jamba-bf16 --backend cuda --dtype bf16 2>&1 | grep -v "^hidden\|^router" | tail -6
fi
if [ "$WHAT" = s21-host2 ]; then
  # Session 21, a second host: the conv kernel tests (its tensor-op reference now on a
  # contiguous weight), then the standard command twice.
  ./kernels --test-threads 1 conv 2>&1 | grep -E "^test |test result|FAIL|panicked|rel. error" | head -8
  for round in 1 2; do
    echo "== the standard command, round $round"
    standard_command "-s21-host2-$round"
  done
fi
if [ "$WHAT" = s21 ]; then
  # Session 21: this build against session 20's (`jamba-bench-s20`, staged beside it),
  # alternated on one host; then each new switch alone; the standard command; ncu of a prefill.
  P="throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --decode-steps 0 --reps 5 --warmup 2 --prefill 512,2048"
  for round in 1 2; do
    echo "== round $round: session 20's build / this build"
    [ -x ./jamba-bench-s20 ] && ./jamba-bench-s20 $P 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/s20  /"
    ./jamba-bench $P 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/s21  /"
    [ -x ./jamba-bench-s20 ] && decode_bench ./jamba-bench-s20 s20
    decode_bench ./jamba-bench s21
  done
  echo "== switches: greedy pipeline off; device top-k off"
  JAMBA_PIPELINE=off decode_bench ./jamba-bench pipeline-off
  decode_bench ./jamba-bench default
  JAMBA_DEVICE_TOPK=off ./jamba-bench $P 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/topk-off  /"
  ./jamba-bench $P 2>&1 >/dev/null | grep -E "^prefill" | sed "s/^/default   /"
  for round in 1 2; do
    echo "== the standard command, round $round"
    standard_command "-s21-$round"
  done
  ncu_prefill 20
fi
if [ "$WHAT" = scan-stalls ]; then
  echo "== why the chunked scan waits: ncu stall reasons per issued instruction, (1, 8192, 4096) bf16"
  ncu --clock-control none --kernel-name regex:scan_chunk --launch-count 2 \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active" \
    ./jamba-bench kernels --backend cuda --dtypes bf16 --shapes 1x8192x4096 --ops scan --tensor-ops-max 0 --reps 1 --min-ms 0 \
    2>&1 | grep -E "scan_chunk|duration|registers|warps_active|issue_active|pipe_xu|stalled" | awk '$NF+0 > 0.05 || /scan_chunk|duration|registers/' | head -60
fi
if [ "$WHAT" = step ]; then
  echo "== decoding state update: scalar step kernel (vectors 0) vs 16-byte vectors, 1 or 2 per unit, then ncu"
  for v in 0 1 2; do
    JAMBA_STEP_VECTORS_PER_UNIT=$v ./jamba-bench kernels --backend cuda --tensor-ops-max 0 --ops update \
      --reps 9 2>&1 | sed "s/^/vectors=$v  /"
  done
  for units in 128 512; do
    JAMBA_STEP_CUBE_UNITS=$units ncu --clock-control none --kernel-name regex:scan_step --launch-count 3 \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
      ./jamba-bench kernels --backend cuda --dtypes f32 --ops update --tensor-ops-max 0 --reps 1 --min-ms 0 \
      2>&1 | grep -E "gpu__time|throughput" | sed "s/^/units=$units  /" | tail -2
  done
  for v in 0 1 2; do
    JAMBA_STEP_VECTORS_PER_UNIT=$v ncu --clock-control none --kernel-name regex:scan_step --launch-count 6 \
      --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
      ./jamba-bench kernels --backend cuda --dtypes f32 --ops update --tensor-ops-max 0 --reps 1 --min-ms 0 \
      2>&1 | grep -E "gpu__time|throughput|registers|warps_active" | sed "s/^/vectors=$v  /" | tail -8
  done
fi
if [ "$WHAT" = routed ]; then
  echo "== device-routed MoE on CUDA: every case, each stage against the host given the previous stage's device output"
  ./kernels --test-threads 1 --nocapture routed 2>&1 | grep -E "routed experts|test result" | head -24
  echo "== jamba check on CUDA (the routed kernel decodes)"
  for f in fixtures/*/; do
    ./jamba check "$f" --backend cuda 2>&1 | grep -E "passed|failed|FAIL" | head -3
  done
fi
if [ "$WHAT" = ncu-prefill ] || [ "$WHAT" = ncu-model ]; then
  # Each measurement profiled twice, the second with one more repetition: the difference
  # (ncu_summary.py --minus) is one steady-state prefill / 8 decode steps, without the model's
  # initialisation and the matmul autotuning of the first repetition. ncu-prefill stops
  # after the prefill; ncu-model also profiles 8 decode steps (b1).
  echo "== ncu: device time of every kernel of a 2048-token prefill ($WHAT)"
  B="./jamba-bench throughput --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 --warmup 1"
  M="ncu --clock-control none --metrics gpu__time_duration.sum --csv"
  $M --log-file "$OUT/ncu-prefill-1.csv" $B --reps 1 --prefill 2048 --decode-steps 0 > /dev/null 2>&1
  $M --log-file "$OUT/ncu-prefill-2.csv" $B --reps 2 --prefill 2048 --decode-steps 0 > /dev/null 2>&1
  python3 ncu_summary.py "$OUT/ncu-prefill-2.csv" --minus "$OUT/ncu-prefill-1.csv" --top 15
  if [ "$WHAT" = ncu-model ]; then
    $M --log-file "$OUT/ncu-decode-1.csv" $B --reps 1 --prefill 0 --decode-context 512 --decode-steps 4 > /dev/null 2>&1
    $M --log-file "$OUT/ncu-decode-2.csv" $B --reps 1 --prefill 0 --decode-context 512 --decode-steps 12 > /dev/null 2>&1
    python3 ncu_summary.py "$OUT/ncu-decode-2.csv" --minus "$OUT/ncu-decode-1.csv" --top 15
  fi
  (cd "$OUT" && xz -6 ncu-*.csv)
fi
if [ "$WHAT" = matmul ]; then
  echo "== half-precision products of a prefill's shapes: every cubek strategy vs Burn's autotuned choice"
  ./jamba-bench matmul --backend cuda --dtype bf16 2>&1 | tee "$OUT/matmul.txt"
fi
if [ "$WHAT" = profile ]; then
  echo "== a decoding step component by component, batch 1 and 16"
  for b in 1 16; do
    ./jamba-bench profile --config configs/bench-jamba-1b.config.json --backend cuda --dtype bf16 \
      --batch $b --context 512 2>&1 | tail -14
  done
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
