"""What a run sets up before its stages: the device, the random seeds, the initial weights."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch

from approxrun.errors import ApproxrunError, ConfigError, one_line


def select_device(name: str) -> torch.device:
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def seed_everything(seed: int, loader_generator: torch.Generator | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if loader_generator is not None:
        loader_generator.manual_seed(seed)


def seed_stage(key: str, loader_generator: torch.Generator | None) -> None:
    """Seed every random state from a stage's key (a hash of everything upstream, the run seed
    included): the stage draws the same numbers whether the stages before it ran or came from the
    stage cache."""
    seed_everything(int(key[:15], 16), loader_generator)


def load_initial_weights(path: str, model: torch.nn.Module) -> None:
    """Load ``init_weights``: a weights-only state_dict (e.g. a stage checkpoint of an earlier run)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ApproxrunError(f"initial weights {file}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApproxrunError(f"initial weights {file}: not a readable weights-only torch checkpoint "
                             f"({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ApproxrunError(f"initial weights {file}: expected a state_dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ApproxrunError(f"initial weights {file}: does not fit the model ({one_line(str(exc))})") from None
