#!/usr/bin/env python3
"""Static instruction mix of CubeCL kernels, from a CubeCL compilation log.

Run a command with CUBECL_DEBUG_LOG=<log> (CubeCL then logs each kernel's CUDA source), then
    python3 kernel_sass.py <log> <kernel-name-substring> [--nvcc /usr/local/cuda/bin/nvcc]
compiles every logged kernel whose source contains the substring as NVRTC would (sm_90a), and
prints the SASS opcode counts of each (what the issue slots of the kernel go to) and ptxas's
registers per unit and spills.
"""
import argparse, collections, os, re, subprocess, sys, tempfile

ap = argparse.ArgumentParser()
ap.add_argument("log")
ap.add_argument("name")
ap.add_argument("--nvcc", default="/usr/local/cuda/bin/nvcc")
ap.add_argument("--arch", default="sm_90a")
ap.add_argument("--top", type=int, default=18)
ap.add_argument("--dump", help="folder to write each kernel's CUDA source and SASS into")
args = ap.parse_args()
text = open(args.log, errors="replace").read()
blocks = re.findall(r"source:\n```\w*\n(.*?)\n```\n\[END_KERNEL_COMPILATION\]", text, re.S)
picked = [b for b in blocks if args.name in b]
if not os.path.exists(args.nvcc):
    sys.exit(f"no nvcc at {args.nvcc}")
print(f"{len(blocks)} kernels logged, {len(picked)} contain {args.name!r}")
cuobjdump = os.path.join(os.path.dirname(args.nvcc), "cuobjdump")
inc = os.path.join(os.path.dirname(os.path.dirname(args.nvcc)), "include")
with tempfile.TemporaryDirectory() as tmp:
    for i, src in enumerate(picked):
        cu, cubin = os.path.join(tmp, f"k{i}.cu"), os.path.join(tmp, f"k{i}.cubin")
        open(cu, "w").write(src)
        r = subprocess.run([args.nvcc, f"-arch={args.arch}", "-cubin", "-lineinfo", "-Xptxas", "-v", f"-I{inc}", "-o", cubin, cu],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"kernel {i}: nvcc failed:\n{r.stderr[-2000:]}")
            continue
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            open(os.path.join(args.dump, f"k{i}.cu"), "w").write(src)
            open(os.path.join(args.dump, f"k{i}.sass"), "w").write(sass)
        ops = collections.Counter()
        for line in sass.splitlines():
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if m:
                ops[m.group(1).split(".")[0]] += 1
        entry = re.search(r"__global__ void (\w+)", src)
        total = sum(ops.values())
        print(f"kernel {i} ({entry.group(1) if entry else '?'}): {total} instructions")
        print("   " + ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top)))
        # ptxas -v: registers per unit, spills (local memory traffic instead of registers).
        for line in r.stderr.splitlines():
            if "registers" in line or "spill" in line:
                print("   " + line.split("ptxas info    :")[-1].strip())
