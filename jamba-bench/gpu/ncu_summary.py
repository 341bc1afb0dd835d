#!/usr/bin/env python3
"""Sums an `ncu --metrics gpu__time_duration.sum --csv` log by kernel name.

Usage: python3 jamba-bench/gpu/ncu_summary.py out/ncu-prefill-2.csv [--minus out/ncu-prefill-1.csv] [--top 25]

Prints, per kernel name (CubeCL's generated names, shortened), the launch count, the total
device time and its share, and the total over all kernels: where a model step's GPU time goes.
With `--minus`, another log's counts and times are subtracted first: profile the same program
with one more repetition and subtract, and what remains is one steady-state repetition (no model
initialisation, no autotuning, which the first repetition carries).
"""

import csv
import re
import sys
from collections import defaultdict


def short(name: str) -> str:
    # CubeCL names kernels after the Rust function plus a hash of the comptime settings.
    name = re.sub(r"_[0-9a-f]{8,}", "", name)
    return name[:90]


SCALE_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def rows(path: str):
    """The rows of an `ncu --csv` log (one per kernel launch and metric), past ncu's own output."""
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    return csv.DictReader(lines[start:])


def load(path: str):
    """(microseconds, launches) per shortened kernel name."""
    total = defaultdict(float)
    count = defaultdict(int)
    for row in rows(path):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        key = short(row["Kernel Name"])
        total[key] += value * SCALE_TO_US[row["Metric Unit"]]
        count[key] += 1
    return total, count


def main() -> None:
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 25
    total, count = load(sys.argv[1])
    if "--minus" in sys.argv:
        less_total, less_count = load(sys.argv[sys.argv.index("--minus") + 1])
        for key in set(total) | set(less_total):
            total[key] -= less_total.get(key, 0.0)
            count[key] -= less_count.get(key, 0)
        total = {k: v for k, v in total.items() if count[k] != 0 or abs(v) > 1.0}
    grand = sum(total.values())
    print(f"{sum(count.values())} launches, {grand / 1e3:.3f} ms of device time")
    for key, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{us / 1e3:9.3f} ms {100 * us / grand:5.1f}% {count[key]:6d}x  {key}")


if __name__ == "__main__":
    main()
