"""Wall time of a 4-job smoke sweep run one job after another against the same sweep through
``submitit_local`` (all four jobs at once), with ``threads=auto`` and with every job sized for the
whole machine (torch's default, what happened before the ``threads`` setting). Target: the
parallel sweep with ``threads=auto`` takes at most 1.2x the sequential time.

Run: python benchmarks/bench_threads.py [--multipliers exact,drum_6,drum_4,truncated_6] [--skip-oversubscribed]
Other processes on the machine distort the numbers: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

from approxrun.threads import available_cpus

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu_description() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return f"{model}; {available_cpus()} CPUs for this process; " + \
        ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in FLAGS)


def sweep_seconds(folder: Path, multipliers: str, *extra: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    command = ["approxrun", "-m", "experiment=smoke", f"multiplier={multipliers}", "cache.enabled=false",
               "device=cpu", f"hydra.sweep.dir={folder}", *extra]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multipliers", default="exact,drum_6,drum_4,truncated_6")
    parser.add_argument("--skip-oversubscribed", action="store_true",
                        help="leave out the sweep whose jobs each use every core (slow)")
    args = parser.parse_args()
    print(cpu_description())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    runs = [("sequential (basic launcher)", ()),
            ("submitit_local, threads=auto", ("hydra/launcher=submitit_local",))]
    if not args.skip_oversubscribed:
        runs.append((f"submitit_local, threads={available_cpus()} per job",
                     ("hydra/launcher=submitit_local", f"threads={available_cpus()}")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (label, extra) in enumerate(runs):
            rows.append((label, sweep_seconds(Path(tmp) / str(index), args.multipliers, *extra)))
    sequential = rows[0][1]
    print(f"{'sweep of ' + str(len(args.multipliers.split(','))) + ' smoke jobs':<40} {'wall s':>8} {'vs sequential':>14}")
    for label, seconds in rows:
        print(f"{label:<40} {seconds:8.1f} {seconds / sequential:13.2f}x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
