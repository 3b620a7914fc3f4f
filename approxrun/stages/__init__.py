"""Stages: plain functions ``(ctx, stage_cfg) -> StageResult`` kept in a registry by kind.

A schedule (``conf/schedule/*.yaml``) is data: an ordered list of stage names, each with a
``kind``. Adding a stage kind means registering a function here; the runner does not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from approxrun.data import DataBundle
from approxrun.distributed import Distributed, Placement
from approxrun.errors import ApproxrunError
from approxrun.multipliers.multiplier import Multiplier


@dataclass
class StageContext:
    """What a stage works with. ``state`` carries results between stages (e.g. an assignment)."""

    model: nn.Module
    data: DataBundle
    loaders: tuple  # train, val, test
    device: torch.device
    multiplier: Multiplier
    config: Mapping  # the whole run config as plain containers
    artifact_dir: Path  # files the stage writes (kept with the stage's cache entry and the run)
    resolve_multiplier: Callable[[str], Multiplier]
    state: dict = field(default_factory=dict)
    log: logging.Logger = logging.getLogger("approxrun")
    # the ranks of a data-parallel job (one process: every collective is the identity)
    dist: Distributed = field(default_factory=lambda: Distributed(Placement(), torch.device("cpu")))


@dataclass
class StageResult:
    """A stage's metrics (json-serialisable) and the state it passes on to later stages."""

    metrics: dict
    state: dict = field(default_factory=dict)


TRAINING_SETTINGS = ("epochs", "optimizer", "scheduler")


@dataclass(frozen=True)
class StageKind:
    run: Callable[[StageContext, Mapping], StageResult]
    uses_multiplier: bool  # the multiplier is part of the stage's cache key
    cacheable: bool = True
    trains: bool = True  # needs epochs/optimizer settings
    settings: tuple[str, ...] = ()  # the stage's own config keys, besides kind, name and training

    @property
    def accepted(self) -> tuple[str, ...]:
        """The settings a stage entry of this kind may hold besides kind and name (others are typos)."""
        return (*(TRAINING_SETTINGS if self.trains else ()), *self.settings)


STAGE_KINDS: dict[str, StageKind] = {}


def register(kind: str, uses_multiplier: bool = False, cacheable: bool = True, trains: bool = True,
             settings: tuple[str, ...] = ()):
    """Decorator adding a stage function to the registry under ``kind``; ``settings`` lists the
    stage's own config keys, so that a misspelt one is refused before any stage runs."""
    def wrap(fn):
        STAGE_KINDS[kind] = StageKind(fn, uses_multiplier, cacheable, trains, tuple(settings))
        return fn
    return wrap


def stage_kind(kind: str) -> StageKind:
    _load_builtin_stages()
    if kind not in STAGE_KINDS:
        raise ApproxrunError(f"unknown stage kind {kind!r}: expected one of {', '.join(sorted(STAGE_KINDS))}")
    return STAGE_KINDS[kind]


def _load_builtin_stages() -> None:
    from approxrun.stages import training_stages  # noqa: F401  (registers its stages)
    from approxrun.stages import agn  # noqa: F401  (registers gradient and select)
