"""The stage cache: completed stage results on disk, keyed by a hash of everything that influences them.

:func:`stage_keys` chains the keys (model, dataset, seed, quantization, trained and initial weights, then each
stage's settings and, for stages that use it, the multiplier's LUT); :class:`StageCache` stores and
finds entries. Runs of a sweep may share one cache folder: entries are complete or absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from approxrun.multipliers.multiplier import Multiplier

log = logging.getLogger("approxrun")


def multiplier_fingerprint(multiplier: Multiplier) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(multiplier.lut).tobytes()).hexdigest()[:16]
    return f"{multiplier.name}:{multiplier.domain_a}x{multiplier.domain_b}:{digest}"


def content_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def stage_keys(config: dict, stages: list[dict], multiplier: Multiplier, uses_multiplier,
               weights_fingerprint: str | None = None) -> list[tuple[str, str]]:
    """(stage name, key) of each stage: a hash of the key before it, its settings and, when
    ``uses_multiplier(kind)``, the multiplier's LUT. The first key covers everything upstream
    (``weights_fingerprint``: the content of a ``model.weights`` file)."""
    from approxrun import __version__

    model_cfg = {k: v for k, v in config["model"].items() if k != "train"}
    key = content_hash(__version__, model_cfg, config["dataset"], config["seed"], config["quant"],
                       config.get("init_weights"), *([weights_fingerprint] if weights_fingerprint else []))
    # the operand domains set the quantizers: every stage after an FP32 baseline depends on them
    domains = [str(multiplier.domain_a), str(multiplier.domain_b)]
    keys = []
    for stage in stages:
        key = content_hash(key, stage, multiplier_fingerprint(multiplier) if uses_multiplier(stage["kind"]) else None,
                           None if stage["kind"] == "baseline" else domains)
        keys.append((stage["name"], key))
    return keys


@dataclass
class StageCache:
    """An entry is a folder ``<stage>-<key>`` holding ``model.pt``, ``result.json`` and ``files/``;
    it is written under a temporary name and renamed into place, so it is complete or absent.
    ``root`` None: no cache (``cache.enabled=false``)."""

    root: Path | None

    def entry(self, name: str, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{name}-{key[:20]}"

    def load(self, name: str, key: str):
        """(model state, result, files folder) of a stored entry, or None."""
        path = self.entry(name, key)
        if path is None or not (path / "result.json").is_file():
            return None
        try:
            state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            result = json.loads((path / "result.json").read_text())
        except Exception as exc:
            log.warning("stage cache entry %s is unreadable (%s); recomputing", path, exc)
            return None
        return state, result, path / "files"

    def store(self, name: str, key: str, model_state: dict, result: dict, files: Path) -> None:
        final = self.entry(name, key)
        if final is None:
            return
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            torch.save(model_state, tmp / "model.pt")
            (tmp / "result.json").write_text(json.dumps(result, default=str))
            shutil.copytree(files, tmp / "files")
            tmp.rename(final)  # atomic; fails if another job stored the same entry first
        except OSError:
            if not (final / "result.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
