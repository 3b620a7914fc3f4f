"""The ``approxrun`` command: a thin Hydra layer over :func:`approxrun.pipeline.run`.

Before Hydra parses the command line, group choices are checked (one-line errors listing the
options) and shortcuts are expanded: ``multiplier=NAME`` for any design or EvoApproxLib circuit
(registered as a choice of the multiplier group, so no file is needed) and ``multiplier=LUT_FILE``;
``model=NAME`` for any torchvision model; ``model._target_=...`` / ``dataset._target_=...`` without
a group choice select the ``custom`` option. Hydra then composes the config once, on top of the
schema (approxrun/config/schema.py), and a single run's inputs that can be checked before its run
folder exists are (:class:`InputCheck`: ``_target_`` imports, the weights file, the world size).
Every bad key or value ends with one line on stderr and exit status 2; a run that fails ends with
exit status 1. Under torchrun, ranks other than 0 write no run folder and print nothing. Heavy
modules (torch) are imported only to run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from approxrun.config.schema import StageEntry, register_multiplier_name
from approxrun.errors import ApproxrunError, ConfigError, one_line
from approxrun.multipliers.io import LUT_SUFFIXES

PROG = "approxrun"
USAGE_ERROR, RUN_FAILED = 2, 1
GROUPS = ("model", "dataset", "multiplier", "schedule", "experiment", "library")
_GROUP_CHOICE = re.compile(rf"({'|'.join(GROUPS)})=(.+)")
SWEEP_JOBS_ENV = "APPROXRUN_SWEEP_JOBS"  # set for a sweep's jobs (hydra.job.env_set): how many there are
_failures: list[tuple[str, int]] = []  # (message, exit status) of each failed job


def group_options(group: str) -> list[str]:
    """The choices of a config group: its files in ``conf/`` and its ConfigStore entries."""
    folder = resources.files("approxrun.conf").joinpath(group)
    files = [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")] if folder.is_dir() else []
    stored = ConfigStore.instance().repo.get(group, {})
    return sorted(set(files) | {name[:-5] for name in stored if name.endswith(".yaml")})


def _split_choices(value: str) -> list[str] | None:
    """The comma-separated choices of a simple sweep value; None for sweep functions or quoting."""
    if any(ch in value for ch in "()[]{}'\"$"):
        return None
    return [v.strip() for v in value.split(",")]


def expand_arguments(argv: list[str]) -> list[str]:
    """Check config-group choices and expand the multiplier/model shortcuts (see module docstring).

    Also for ``compose()`` users: ``compose("config", overrides=expand_arguments([...]))``.
    """
    out = []
    for arg in argv:
        match = _GROUP_CHOICE.fullmatch(arg)
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
        elif group == "multiplier" and all(re.fullmatch(r"[\w-]+", c) for c in unknown):
            for name in unknown:  # designs and EvoApprox names resolve at run time
                register_multiplier_name(name)
            out.append(arg)
        elif group == "multiplier":
            out.append(f"multiplier.name={match.group(2)}")  # e.g. an EvoApproxLib .c file
        elif group == "model" and len(choices) == 1 and choices[0] in _torchvision_names():
            out += ["model=torchvision", f"model.name={choices[0]}"]
        else:
            raise ConfigError(f"{group}={','.join(unknown)}: unknown {group}; options: {', '.join(options)}"
                              + (" or a torchvision model name" if group == "model" else ""))
    for group in ("model", "dataset"):  # a factory is the custom option
        target = next((a.lstrip("+") for a in out if re.match(rf"\+*{group}\._target_=", a)), None)
        choice = next((a for a in out if a.startswith(f"{group}=")), None)
        if target and choice is None:
            out.insert(0, f"{group}=custom")
        elif target and choice != f"{group}=custom":
            raise ConfigError(f"{target}: a factory replaces the {group} choice; drop {choice} "
                              f"(or give {group}=custom)")
    return out


def _torchvision_names() -> list[str]:
    from approxrun.models import torchvision_names

    return torchvision_names()


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


def check_inputs(cfg: DictConfig, env=os.environ) -> None:
    """What can be checked before a run folder exists: ``_target_`` factories import, the weights
    file exists, the world size of a torchrun job divides the batch (each a :class:`ConfigError`)."""
    from approxrun.distributed import placement_from_env
    from approxrun.targets import locate
    from approxrun.weights import check_weights_spec

    for group in ("model", "dataset"):
        target = OmegaConf.select(cfg, f"{group}._target_", throw_on_missing=False)
        if target:
            locate(target, f"{group}._target_")
    check_weights_spec(OmegaConf.select(cfg, "model.weights", throw_on_missing=False))
    batch_size = OmegaConf.select(cfg, "dataset.batch_size", throw_on_missing=False)
    if isinstance(batch_size, int):
        placement_from_env(env).check_batch(batch_size)


class InputRefused(BaseException):
    """A single run's input refused by :class:`InputCheck`. Not an ``Exception``: Hydra turns those,
    raised in a callback, into a warning and goes on to create the run folder."""


class InputCheck(Callback):
    """Checks a single run's inputs (:func:`check_inputs`) before Hydra creates its run folder.
    A sweep's jobs are checked by the run itself (a failed job keeps its ``metrics.json``)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            check_inputs(config)
        except ConfigError as exc:
            raise InputRefused(str(exc)) from None


def _other_rank(env=os.environ) -> bool:
    """A torchrun rank other than 0: it writes no run folder and prints nothing."""
    return env.get("RANK", "0") not in ("", "0") and env.get("WORLD_SIZE", "1") not in ("", "1")


def composition_message(exc: BaseException) -> str:
    """One line for an error Hydra raised while composing the config (bad key, type or override)."""
    text = one_line(str(exc)).rstrip(".")
    if isinstance(exc, OverrideParseException):  # Hydra's grammar: quote values with = , [ ] { } ( )
        return f"cannot parse {exc.override!r}: {text} (quote a value that holds = , or brackets)"
    cause = exc.__cause__
    section, key = getattr(cause, "object_type", None), getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key and dataclasses.is_dataclass(section):
        known = ", ".join(f.name for f in dataclasses.fields(section) if f.name not in ("kind", "name"))
        if issubclass(section, StageEntry):
            return f"{key}: not a setting of a {section.kind} stage (expected: {known})"
        parent = key.rpartition(".")[0]
        return f"{key}: not a config key" + (f" (keys of {parent}: {known})" if parent else "")
    if isinstance(cause, OmegaConfBaseException):
        detail = one_line(getattr(cause, "msg", None) or str(cause))
        text = f"{text}: {detail}" if detail not in text else text
    return text


class SweepSummary(Callback):
    """Builds the sweep summary from the job folders when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from approxrun.report import write_summary

        rows = write_summary(Path(config.hydra.sweep.dir))
        failed = [r["job"] for r in rows if r["status"] != "completed"]
        if failed:
            _failures.append((f"failed jobs: {', '.join(failed)}", RUN_FAILED))
        if not rows:
            _failures.append(("no job of the sweep wrote metrics.json", RUN_FAILED))
        print(f"sweep summary: {Path(config.hydra.sweep.dir) / 'summary.md'}", flush=True)


@hydra.main(version_base="1.3", config_path="pkg://approxrun.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from approxrun.pipeline import run

    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        run(cfg, out_dir, concurrent_jobs=concurrent_jobs(hydra_cfg.launcher))
    except ConfigError as exc:
        _fail(str(exc), USAGE_ERROR)
    except ApproxrunError as exc:
        _fail(str(exc), RUN_FAILED)
    except Exception as exc:  # a bug, not a user mistake: the traceback is in the run's log
        _fail(f"{one_line(exc)} (traceback in {out_dir / 'approxrun.log'})", RUN_FAILED)


def _fail(message: str, status: int) -> None:
    _error(message)
    _failures.append((message, status))


def _error(message: str) -> None:
    if not _other_rank():  # the ranks fail alike; rank 0 says it
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def main() -> None:
    """Entry point of the ``approxrun`` command (exit 2: bad command line or config; 1: a run failed)."""
    try:
        args = expand_arguments(sys.argv[1:])
    except ApproxrunError as exc:
        _error(str(exc))
        sys.exit(USAGE_ERROR)
    informational = any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version")
                        or a.startswith(("--shell-completion", "-sc")) for a in args)
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
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions, not as Hydra's report
    try:
        _hydra_main()
    except InputRefused as exc:
        _error(str(exc))
        sys.exit(USAGE_ERROR)
    except (HydraException, OmegaConfBaseException) as exc:
        _error(composition_message(exc))
        sys.exit(USAGE_ERROR)
    except Exception as exc:
        _error(one_line(exc))
        sys.exit(RUN_FAILED)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if _failures:
        sys.exit(max(status for _, status in _failures))
