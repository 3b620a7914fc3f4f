"""Stages: plain functions ``(ctx, stage_cfg) -> StageResult`` kept in a registry by kind.

A schedule (``conf/schedule/*.yaml``) is data: an ordered list of stage names, each with a
``kind``. Adding a stage kind means a settings class in approxrun/config/schema.py and a function
registered with it; the runner does not change. ``ctx.progress`` is the stage's training progress
(epoch-end saving and resuming), which :func:`approxrun.stages.training_stages.train_and_test`
hands to :func:`approxrun.training.train`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from approxrun.config import complete
from approxrun.config.schema import TrainingStage
from approxrun.data import DataBundle
from approxrun.errors import ConfigError
from approxrun.multipliers.multiplier import Multiplier
from approxrun.training import TrainingProgress


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
    progress: TrainingProgress | None = None  # epoch-end saving and resuming of the stage's training
    log: logging.Logger = logging.getLogger("approxrun")


@dataclass
class StageResult:
    """A stage's metrics (json-serialisable) and the state it passes on to later stages."""

    metrics: dict
    state: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StageKind:
    """A registered stage function with its settings class (approxrun/config/schema.py)."""

    fn: Callable[[StageContext, Mapping], StageResult]
    settings: type  # the stage's settings (a TrainingStage subclass when it trains)
    uses_multiplier: bool  # the multiplier is part of the stage's cache key
    cacheable: bool = True

    @property
    def trains(self) -> bool:
        return issubclass(self.settings, TrainingStage)

    def run(self, ctx: StageContext, stage_cfg: Mapping) -> StageResult:
        """Run the stage on its settings, the schema's defaults filled in."""
        return self.fn(ctx, complete(self.settings, stage_cfg, f"schedule.stages.{stage_cfg.get('name')}."))


STAGE_KINDS: dict[str, StageKind] = {}


def register(kind: str, settings: type = TrainingStage, uses_multiplier: bool = False, cacheable: bool = True):
    """Decorator adding a stage function to the registry under ``kind``; ``settings`` is the class of
    the stage's config entry (a misspelt key is refused before any stage runs)."""
    def wrap(fn):
        STAGE_KINDS[kind] = StageKind(fn, settings, uses_multiplier, cacheable)
        return fn
    return wrap


def stage_kind(kind: str) -> StageKind:
    _load_builtin_stages()
    if kind not in STAGE_KINDS:
        raise ConfigError(f"unknown stage kind {kind!r}: expected one of {', '.join(sorted(STAGE_KINDS))}")
    return STAGE_KINDS[kind]


def _load_builtin_stages() -> None:
    from approxrun.stages import training_stages  # noqa: F401  (registers its stages)
    from approxrun.stages import agn  # noqa: F401  (registers gradient and select)
