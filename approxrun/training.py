"""The training loop, evaluation, and optimizer/scheduler construction from a stage config.

Inside :func:`epoch_checkpoints` (the runner opens one around each stage), :func:`train` hands its
complete state to a callback at every epoch end and, given the state of an interrupted run,
continues from it; the resumed run is bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from approxrun.errors import ApproxrunError

if TYPE_CHECKING:
    from approxrun.distributed import Distributed

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "multistep", "cosine")


class TrainingDiverged(ApproxrunError):
    """The loss became NaN or infinite; the stage stops."""


def rng_state(loader_generator: torch.Generator | None) -> dict:
    """Every random state a run draws from: python, numpy, torch (CPU, CUDA) and the loader's shuffling."""
    bit_generator = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {**bit_generator, "state": {"key": bit_generator["state"]["key"].tolist(),
                                                 "pos": bit_generator["state"]["pos"]}},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "loader": None if loader_generator is None else loader_generator.get_state()}


def set_rng_state(state: Mapping, loader_generator: torch.Generator | None) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


@dataclass
class EpochCheckpoints:
    """Epoch-end checkpointing of the :func:`train` calls inside one stage.

    ``save`` receives a dict (``call``, ``epoch``, ``model``, ``optimizer``, ``scheduler``, ``rng``,
    ``history``) at every epoch end; ``resume_from`` is such a dict from an interrupted run, used by
    the train call with the same ``call`` number (a stage's first train call is 0).
    """

    save: Callable[[dict], None]
    resume_from: dict | None = None
    calls: int = 0


_active_checkpoints: ContextVar[EpochCheckpoints | None] = ContextVar("approxrun_epoch_checkpoints", default=None)


@contextmanager
def epoch_checkpoints(save: Callable[[dict], None], resume_from: dict | None = None) -> Iterator[EpochCheckpoints]:
    """Checkpoint (and resume) every :func:`train` call made inside the ``with`` block."""
    checkpoints = EpochCheckpoints(save, resume_from)
    token = _active_checkpoints.set(checkpoints)
    try:
        yield checkpoints
    finally:
        _active_checkpoints.reset(token)


def make_optimizer(params, cfg: Mapping) -> torch.optim.Optimizer:
    name = cfg.get("name", "sgd")
    lr, wd = float(cfg["lr"]), float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ApproxrunError(f"optimizer.name: unknown optimizer {name!r}, expected one of {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer, cfg: Mapping | None, epochs: int):
    cfg = cfg or {}
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, int(cfg["step_size"]), float(cfg.get("gamma", 0.1)))
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m) for m in cfg["milestones"]],
                                                    float(cfg.get("gamma", 0.1)))
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    raise ApproxrunError(f"scheduler.name: unknown scheduler {name!r}, expected one of {', '.join(SCHEDULERS)}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, num_classes: int, desc: str | None = None,
             dist: Distributed | None = None) -> dict:
    """Loss, top-1 accuracy (a fraction) and, with more than 10 classes (the dataset's or the
    model's outputs), top-5 accuracy; ``desc`` shows a progress bar (on a terminal). With ``dist``
    the loader holds this rank's share and the sums are taken over all ranks."""
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if desc else True):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        num_classes = max(num_classes, logits.shape[1])
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(1).sum().item()
        total += len(y)
    if dist is not None:
        total, loss_sum, correct1, correct5 = dist.sum([total, loss_sum, correct1, correct5])
    result = {"loss": loss_sum / max(1, total), "accuracy": correct1 / max(1, total)}
    if num_classes > 10:
        result["top5"] = correct5 / max(1, total)
    return result


def train(model: nn.Module, train_loader, val_loader, stage_cfg: Mapping, device: torch.device,
          num_classes: int, params=None, extra_loss: Callable[[], torch.Tensor] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None, desc: str = "",
          dist: Distributed | None = None) -> list[dict]:
    """Train for ``stage_cfg['epochs']`` epochs; returns one dict per epoch (loss, accuracies, lr).

    ``extra_loss`` is added to the cross-entropy at every step (e.g. the noise reward);
    ``on_epoch_end(epoch, record)`` may add entries to the epoch's record. Inside
    :func:`epoch_checkpoints` the state is saved at every epoch end and an interrupted call resumes
    (``on_epoch_end`` is not called again for the epochs it restores). With ``dist`` (several ranks)
    the loader yields this rank's share of each global batch, steps run through DistributedDataParallel
    and each share's loss is weighted so that the gradient is the global batch's mean.
    """
    epochs = int(stage_cfg["epochs"])
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    optimizer = make_optimizer(params, stage_cfg["optimizer"])
    scheduler = make_scheduler(optimizer, stage_cfg.get("scheduler"), epochs)
    loader_generator = getattr(train_loader, "generator", None)
    step_model = dist.wrap(model) if dist is not None else model
    checkpoints = _active_checkpoints.get()
    history, first_epoch, call, resume = [], 0, None, None
    if checkpoints is not None:
        call, resume = checkpoints.calls, checkpoints.resume_from
        checkpoints.calls += 1
    if resume is not None and resume["call"] == call:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"], loader_generator)
        history, first_epoch = list(resume["history"]), int(resume["epoch"])
        log.info("%s: resuming after epoch %d/%d", desc, first_epoch, epochs)
    for epoch in range(first_epoch, epochs):
        model.train()
        start, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                   disable=None if dist is None or dist.is_main else True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            logits = step_model(x)
            if dist is None or not dist.active:
                loss = F.cross_entropy(logits, y)
                batch_size, batch_loss, batch_correct = len(y), loss.item() * len(y), (logits.argmax(1) == y).sum().item()
            else:
                share_loss = F.cross_entropy(logits, y, reduction="sum")
                batch_size, batch_loss, batch_correct = dist.sum(
                    [len(y), share_loss.item(), (logits.argmax(1) == y).sum().item()])
                loss = share_loss * (dist.world_size / batch_size)  # DDP averages: the global batch's mean
            total = loss + extra_loss() if extra_loss is not None else loss
            total_value = total.item() if dist is None or not dist.active else \
                batch_loss / batch_size + (total - loss).item()
            if not math.isfinite(total_value):
                raise TrainingDiverged(f"stage {desc}: loss became {total_value} in epoch {epoch + 1}; "
                                       "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            seen += int(batch_size)
            loss_sum += batch_loss
            correct += int(batch_correct)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen),
                  "lr": optimizer.param_groups[0]["lr"]}
        if scheduler is not None:
            scheduler.step()
        val = evaluate(model, val_loader, device, num_classes, dist=dist)
        record.update(val_loss=val["loss"], val_accuracy=val["accuracy"], seconds=time.perf_counter() - start)
        history.append(record)
        log.info("%s epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f (%.1f s)", desc, epoch + 1, epochs,
                 record["train_loss"], record["train_accuracy"], record["val_accuracy"], record["seconds"])
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if checkpoints is not None:
            checkpoints.save({"call": call, "epoch": epoch + 1, "model": model.state_dict(),
                              "optimizer": optimizer.state_dict(),
                              "scheduler": None if scheduler is None else scheduler.state_dict(),
                              "rng": rng_state(loader_generator), "history": history})
    return history
