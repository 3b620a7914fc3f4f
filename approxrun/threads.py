"""How many threads torch may use: the ``threads`` setting (``auto`` or a number).

torch sizes its pool from the machine's cores; jobs that run side by side (a local sweep, several
ranks on one machine) or a Slurm job given fewer CPUs than the node has then oversubscribe the
cores, and every job runs many times slower. ``auto`` takes what this process may use:

1. ``OMP_NUM_THREADS`` when set (the user's or joblib's choice);
2. else the CPUs of the process's affinity mask, capped by ``SLURM_CPUS_PER_TASK`` under Slurm,
   shared out among the jobs that run at once on this machine (``concurrent_jobs``: the local
   launcher's concurrent jobs, or the ranks of a job started with ``torchrun``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from approxrun.errors import ConfigError


@dataclass(frozen=True)
class ThreadBudget:
    count: int
    source: str  # why this count, for the log and metrics.json

    def as_dict(self) -> dict:
        return {"count": self.count, "source": self.source}


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all cores where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_budget(setting, concurrent_jobs: int = 1, env: Mapping[str, str] = os.environ,
                  cpus: int | None = None) -> ThreadBudget:
    """The thread count for ``threads=setting`` (``auto`` or a whole number >= 1, also as a string:
    the config's ``threads`` is a string, OmegaConf having no union of str and int)."""
    if isinstance(setting, str) and setting.strip().isdigit():
        setting = int(setting)
    if isinstance(setting, int) and not isinstance(setting, bool):
        if setting < 1:
            raise ConfigError(f"threads={setting}: expected auto or a whole number >= 1")
        return ThreadBudget(setting, "threads setting")
    if setting != "auto":
        raise ConfigError(f"threads={setting!r}: expected auto or a whole number >= 1")
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return ThreadBudget(int(env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    cpus = available_cpus() if cpus is None else cpus
    source = f"{cpus} CPUs in the affinity mask"
    slurm = env.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and 0 < int(slurm) < cpus:
        cpus, source = int(slurm), f"SLURM_CPUS_PER_TASK={slurm}"
    jobs = max(1, int(concurrent_jobs))
    if jobs > 1:
        source += f" shared by {jobs} concurrent jobs"
    return ThreadBudget(max(1, cpus // jobs), source)


@contextmanager
def torch_threads(budget: ThreadBudget) -> Iterator[ThreadBudget]:
    """torch's intra-op pool sized to ``budget`` inside the block, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(budget.count)
    try:
        yield budget
    finally:
        torch.set_num_threads(before)
