#!/usr/bin/env python3
"""Groups an `ncu --csv` log (one row per kernel launch and metric) by kernel name and launch
geometry: which kernels ran with which grid, how often, and their mean device time and other
metrics. Answers "which matmul kernel did the model's product get, and how does it compare with
the same product in isolation".

Usage: python3 jamba-bench/gpu/ncu_rows.py out/mm-model.csv [--top 20]
"""

import sys
from collections import defaultdict

from ncu_summary import SCALE_TO_US, rows, short


def main() -> None:
    top = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 20
    launches = defaultdict(dict)
    for row in rows(sys.argv[1]):
        launch = launches[row["ID"]]
        launch["name"] = short(row["Kernel Name"])
        launch["grid"] = row.get("Grid Size", "")
        launch["block"] = row.get("Block Size", "")
        value = float(row["Metric Value"].replace(",", "") or 0)
        if row["Metric Name"] == "gpu__time_duration.sum":
            value *= SCALE_TO_US.get(row["Metric Unit"], 1.0)
        launch[row["Metric Name"]] = value
    groups = defaultdict(list)
    for launch in launches.values():
        groups[(launch["name"], launch["grid"], launch["block"])].append(launch)
    ranked = sorted(
        groups.items(),
        key=lambda kv: -sum(l.get("gpu__time_duration.sum", 0) for l in kv[1]),
    )
    for (name, grid, block), ls in ranked[:top]:
        us = [l.get("gpu__time_duration.sum", 0) for l in ls]
        extra = {
            k: sum(l.get(k, 0) for l in ls) / len(ls)
            for k in ls[0]
            if k not in ("name", "grid", "block", "gpu__time_duration.sum")
        }
        extras = " ".join(f"{k.split('__')[-1][:28]}={v:.1f}" for k, v in extra.items())
        print(f"{len(ls):4d}x {sum(us) / len(us):9.1f} us  grid {grid:14} block {block:12} {name}  {extras}")


if __name__ == "__main__":
    main()
