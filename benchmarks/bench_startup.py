"""Start-up time of the commands that should not wait for torch.

Run: ``python benchmarks/bench_startup.py [--repeats N] [--show NAME] [--bin DIR]``
(``--bin``: the console scripts of another installation, e.g. another checkout's venv, to compare). Each command runs N times
as a fresh process (the installed console scripts); the table gives the best and the median wall
time against the 1.5 s target, beside the CPU model and its SIMD flags. A command also reports
whether it imported torch (``python -X importtime``). Timings on a shared machine are noisy: run it
on a quiet one, and compare best times.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.5
FLAGS = ("avx2", "avx512f", "avx512_vnni", "amx_tile")


def cpu_description() -> str:
    """CPU model, core count and which of the SIMD flags it has (Linux /proc/cpuinfo, else platform)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    present = [flag for flag in FLAGS if flag in flags]
    return f"{model}, {os.cpu_count()} logical cores; flags: {', '.join(present) or 'none of ' + '/'.join(FLAGS)}"


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    return elapsed


def imports_torch(command: list[str]) -> bool:
    """Whether the command's process imports torch (its console script run under -X importtime)."""
    python = Path(command[0]).with_name("python")
    python = str(python) if python.exists() else sys.executable
    result = subprocess.run([python, "-X", "importtime", command[0], *command[1:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return any(line.rpartition("|")[2].strip() == "torch" for line in result.stderr.splitlines())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--show", default="drum_6", help="multiplier for approxrun-lut show (default drum_6)")
    parser.add_argument("--bin", default=None, help="folder of the console scripts (default: from PATH)")
    args = parser.parse_args(argv)
    commands = [["approxrun", "--help"], ["approxrun-lut", "list"], ["approxrun-lut", "show", args.show]]
    for command in commands:
        found = shutil.which(command[0], path=args.bin)
        if found is None:
            raise SystemExit(f"{command[0]} is not installed (pip install -e .)")
        command[0] = found
    print(f"CPU: {cpu_description()}")
    print(f"python {platform.python_version()}, {args.repeats} runs per command, load average "
          f"{os.getloadavg()[0]:.2f} at start" if hasattr(os, "getloadavg") else "")
    rows = [("command", "best s", "median s", f"< {TARGET_S} s", "imports torch")]
    for command in commands:
        wall_time(command)  # warm the file cache
        times = [wall_time(command) for _ in range(args.repeats)]
        best = min(times)
        rows.append((" ".join([Path(command[0]).name, *command[1:]]), f"{best:.2f}", f"{statistics.median(times):.2f}",
                     "yes" if best < TARGET_S else "NO", "yes" if imports_torch(command) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
