"""The ``approxrun`` command: a thin Hydra layer over :func:`approxrun.pipeline.run`.

Before Hydra parses the command line, group choices are checked (one-line errors listing the
options) and shortcuts are expanded: ``multiplier=NAME`` for any design/EvoApprox circuit
without its own config file and ``multiplier=LUT_FILE``; ``model=NAME`` for any torchvision model;
``model._target_=...`` / ``dataset._target_=...`` without a group choice select the ``custom`` option.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from approxrun.errors import ApproxrunError
from approxrun.pipeline import run
from approxrun.report import write_summary

GROUPS = ("model", "dataset", "multiplier", "schedule", "experiment", "library")
SWEEP_JOBS_ENV = "APPROXRUN_SWEEP_JOBS"  # set for a sweep's jobs (hydra.job.env_set): how many there are
LUT_SUFFIXES = (".npy", ".txt", ".bin", ".lut")
_failures: list[tuple[str, bool]] = []  # (message, a usage error: bad input rather than a failure)


def group_options(group: str) -> list[str]:
    folder = resources.files("approxrun.conf").joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _split_choices(value: str) -> list[str] | None:
    """The comma-separated choices of a simple sweep value; None for sweep functions or quoting."""
    if any(ch in value for ch in "()[]{}'\"$"):
        return None
    return [v.strip() for v in value.split(",")]


def expand_arguments(argv: list[str]) -> list[str]:
    """Check config-group choices and expand the multiplier/model shortcuts (see module docstring)."""
    from approxrun.models import torchvision_names

    out = []
    for arg in argv:
        match = re.fullmatch(r"(model|dataset|multiplier|schedule|experiment|library)=(.+)", arg)
        choices = _split_choices(match.group(2)) if match else None
        if not match or choices is None:
            out.append(arg)
            continue
        group, options = match.group(1), group_options(match.group(1))
        unknown = [c for c in choices if c not in options]
        if not unknown:
            out.append(arg)
        elif group == "multiplier" and len(choices) == 1 and choices[0].lower().endswith(LUT_SUFFIXES):
            out += ["multiplier=file", f"multiplier.path={choices[0]}"]
        elif group == "multiplier":
            out.append(f"multiplier.name={match.group(2)}")  # designs and EvoApprox names resolve at run time
        elif group == "model" and len(choices) == 1 and choices[0] in torchvision_names():
            out += ["model=torchvision", f"model.name={choices[0]}"]
        else:
            raise ApproxrunError(f"{group}={','.join(unknown)}: unknown {group}; options: {', '.join(options)}"
                                 + (" or a torchvision model name" if group == "model" else ""))
    for group in ("model", "dataset"):
        target = next((a.lstrip("+") for a in out if re.match(rf"\+*{group}\._target_=", a)), None)
        choice = next((a for a in out if a.startswith(f"{group}=")), None)
        if target and choice is None:
            out.insert(0, f"{group}=custom")
        elif target and choice != f"{group}=custom":
            raise ApproxrunError(f"{target}: a factory replaces the {group} choice; drop {choice} "
                                 f"(or give {group}=custom)")
    return out


def sweep_jobs(overrides: list[str]) -> int | None:
    """How many jobs a sweep's comma-separated choices make; None when a sweep function is used."""
    count = 1
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        choices = _split_choices(value)
        if choices is None:
            return None
        count *= len(choices)
    return count


def concurrent_jobs(launcher: DictConfig, env=os.environ) -> int:
    """Jobs of this sweep that run at once on this machine, from the job's launcher config."""
    target = str(launcher.get("_target_", ""))
    jobs = int(env.get(SWEEP_JOBS_ENV, "0") or 0) or os.cpu_count() or 1
    if "joblib" in target.lower():
        n_jobs = int(launcher.get("n_jobs", -1))
        return min(jobs, n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs))
    if target.endswith("LocalLauncher"):  # submitit_local starts every job of the sweep at once
        return jobs
    return 1


def validate_overrides(overrides: list[str]) -> DictConfig:
    """Compose the config once (the first choice of each sweep) so bad keys fail with one line."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    simple = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("hydra") or arg.startswith("-"):
            continue
        choices = _split_choices(value)
        if choices is None:
            continue
        simple.append(f"{key}={choices[0]}")
    try:
        with initialize_config_module("approxrun.conf", version_base="1.3"):
            return compose("config", overrides=simple)
    except Exception as exc:
        raise ApproxrunError(f"bad override: {_first_message(exc)}") from None
    finally:
        GlobalHydra.instance().clear()


def check_inputs(cfg: DictConfig, env=os.environ) -> None:
    """What can be checked before Hydra creates a run folder: ``_target_`` factories import, the
    weights file exists, the world size of a torchrun job divides the batch."""
    from approxrun.distributed import Placement
    from approxrun.targets import locate
    from approxrun.weights import check_weights_spec

    for group in ("model", "dataset"):
        target = OmegaConf.select(cfg, f"{group}._target_", throw_on_missing=False)
        if target:
            locate(target, f"{group}._target_")
    check_weights_spec(OmegaConf.select(cfg, "model.weights", throw_on_missing=False))
    batch_size = OmegaConf.select(cfg, "dataset.batch_size", throw_on_missing=False)
    if isinstance(batch_size, int) and env.get("WORLD_SIZE", "1").isdigit():
        Placement(world_size=int(env.get("WORLD_SIZE", "1"))).check_batch(batch_size)


def _other_rank(env=os.environ) -> bool:
    """A torchrun rank other than 0: it writes no run folder and prints nothing."""
    return env.get("RANK", "0") not in ("", "0") and env.get("WORLD_SIZE", "1") not in ("", "1")


def _first_message(exc: BaseException) -> str:
    """The first non-empty line along the exception's cause chain."""
    while exc is not None:
        line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        if line:
            return line
        exc = exc.__cause__ or exc.__context__
    return "invalid configuration"


class SweepSummary(Callback):
    """Builds the sweep summary from the job folders when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = write_summary(Path(config.hydra.sweep.dir))
        failed = [r["job"] for r in rows if r["status"] != "completed"]
        if failed:
            _failures.append((f"failed jobs: {', '.join(failed)}", False))
        if not rows:
            _failures.append(("no job of the sweep wrote metrics.json", False))
        print(f"sweep summary: {Path(config.hydra.sweep.dir) / 'summary.md'}", flush=True)


@hydra.main(version_base="1.3", config_path="pkg://approxrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, out_dir, concurrent_jobs=concurrent_jobs(hydra_cfg.launcher))
    except ApproxrunError as exc:
        _fail(str(exc), usage=True)
    except Exception as exc:  # a bug, not a user mistake: the traceback is in the run's log
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"{type(exc).__name__}: {message} (traceback in {out_dir / 'approxrun.log'})")


def _fail(message: str, usage: bool = False) -> None:
    if not _other_rank():  # the ranks fail alike; rank 0 says it
        print(f"approxrun: error: {message}", file=sys.stderr, flush=True)
    _failures.append((message, usage))


def main() -> None:
    args = sys.argv[1:]
    informational = any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version")
                        or a.startswith("--shell-completion") or a.startswith("-sc") for a in args)
    try:
        args = expand_arguments(args)
        if not informational:
            check_inputs(validate_overrides([a for a in args if not a.startswith("-")]))
    except ApproxrunError as exc:
        if not _other_rank():
            print(f"approxrun: error: {exc}", file=sys.stderr)
        sys.exit(2)
    scratch = None
    if _other_rank() and not informational:  # Hydra's own files and log go to a folder removed below
        scratch = tempfile.mkdtemp(prefix=f"approxrun-rank{os.environ['RANK']}-")
        args = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
        args += [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra.verbose=false",
                 "hydra.job_logging.root.level=WARNING"]
    if any(a in ("-m", "--multirun") for a in args):
        jobs = sweep_jobs([a for a in args if not a.startswith(("-", "hydra"))])
        args.append(f"++hydra.job.env_set.{SWEEP_JOBS_ENV}={jobs or 0}")
    sys.argv = [sys.argv[0]] + args
    try:
        _hydra_main()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if _failures:  # 2: bad input (a usage error), 1: a job failed
        sys.exit(2 if all(usage for _, usage in _failures) else 1)
