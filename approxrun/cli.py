"""The ``approxrun`` command: a thin Hydra layer over :func:`approxrun.pipeline.run`.

Before Hydra parses the command line, group choices are checked (one-line errors listing the
options) and two shortcuts are expanded: ``multiplier=NAME`` for any design or EvoApproxLib circuit
(registered as a choice of the multiplier group, so no file is needed) and ``multiplier=LUT_FILE``;
``model=NAME`` for any torchvision model. Hydra then composes the config once, on top of the schema
(approxrun/config/schema.py). Every bad key or value ends with one line on stderr and exit status 2;
a run that fails ends with exit status 1. Heavy modules (torch) are imported only to run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from approxrun.config.schema import StageEntry, register_multiplier_name
from approxrun.errors import ApproxrunError, ConfigError, one_line
from approxrun.multipliers.io import LUT_SUFFIXES

PROG = "approxrun"
USAGE_ERROR, RUN_FAILED = 2, 1
GROUPS = ("model", "dataset", "multiplier", "schedule", "experiment", "library")
_GROUP_CHOICE = re.compile(rf"({'|'.join(GROUPS)})=(.+)")
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
    return out


def _torchvision_names() -> list[str]:
    from approxrun.models import torchvision_names

    return torchvision_names()


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

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, out_dir)
    except ConfigError as exc:
        _fail(str(exc), USAGE_ERROR)
    except ApproxrunError as exc:
        _fail(str(exc), RUN_FAILED)
    except Exception as exc:  # a bug, not a user mistake: the traceback is in the run's log
        _fail(f"{one_line(exc)} (traceback in {out_dir / 'approxrun.log'})", RUN_FAILED)


def _fail(message: str, status: int) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    _failures.append((message, status))


def main() -> None:
    """Entry point of the ``approxrun`` command (exit 2: bad command line or config; 1: a run failed)."""
    try:
        sys.argv = [sys.argv[0]] + expand_arguments(sys.argv[1:])
    except ApproxrunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions, not as Hydra's report
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"{PROG}: error: {composition_message(exc)}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except Exception as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(RUN_FAILED)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
    if _failures:
        sys.exit(max(status for _, status in _failures))
