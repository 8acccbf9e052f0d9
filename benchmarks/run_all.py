"""Runs every benchmark and writes one Markdown report (what `make bench` runs).

    python -m benchmarks.run_all                 # docs/performance.md's settings (~30 min, 2 cores)
    python -m benchmarks.run_all --quick         # small settings, a few minutes
    python -m benchmarks.run_all --out benchmarks/results.md

Each benchmark runs in its own subprocess (so one's JAX device setup cannot
leak into another) and prints its own Markdown table; this script collects
them under a header naming the machine, the load average and the date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# The settings behind the tables of docs/performance.md (about 30 minutes on 2 cores).
FULL = {
    "forward_bench": ["--nets", "ffn12_33,default9", "--impls", "depth_split",
                      "--batches", "1,2", "--devices", "1,2", "--repeats", "5"],
    "segment_bench": ["--models", "default", "--data", "synthetic,fib25", "--shape", "32,96,96",
                      "--fib25-bbox", "0,0,0,32,96,96", "--max-seeds", "3",
                      "--batch-sizes", "1,2,4"],
    "train_bench": ["--demo-model", "--data", "both", "--steps", "6"],
    "memory_bench": [],
    "blockwise_bench": [],
}
QUICK = {
    "forward_bench": ["--quick"],
    "segment_bench": ["--models", "small", "--shape", "32,64,64", "--max-seeds", "20",
                      "--batch-sizes", "1,2,4", "--fib25-bbox", "0,0,0,32,64,64"],
    "train_bench": ["--small", "--steps", "10"],
    "memory_bench": ["--shape", "64,96,96", "--model", "small"],
    "blockwise_bench": ["--grids", "1,2"],
}


def machine_header() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}; load average {load}; "
            f"{datetime.datetime.now().isoformat(timespec='minutes')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings (minutes, not tens)")
    p.add_argument("--only", help="comma-separated subset of " + ", ".join(FULL))
    p.add_argument("--out", default="benchmarks/results.md", help="Markdown report path")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(plan)}")
    sections = [f"# ffnjax benchmarks{' (quick)' if args.quick else ''}\n\n{machine_header()}\n"]
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *plan[name]]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        print(proc.stdout[-4000:], flush=True)
        if proc.returncode:
            failed.append(name)
            print(proc.stderr[-4000:], file=sys.stderr)
        sections.append(f"## {name}\n\n`python -m benchmarks.{name} {' '.join(plan[name])}` "
                        f"({took:.0f} s, exit {proc.returncode})\n\n{proc.stdout.strip()}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
