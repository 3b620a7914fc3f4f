"""The training loop, evaluation, and optimizer/scheduler construction from a stage config.

Given a :class:`TrainingProgress` (the runner passes one per stage), :func:`train` hands its
complete state to a callback at every epoch end and, given the state of an interrupted run,
continues from it; the resumed run is bit-identical to an uninterrupted one on the CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from approxrun.config import complete
from approxrun.config.schema import TrainingConfig
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
class TrainingProgress:
    """Epoch-end saving and resuming of the :func:`train` calls of one stage.

    ``save`` receives the epoch state (``call``, ``epoch``, ``model``, ``optimizer``, ``scheduler``,
    ``rng``, ``history``) at every epoch end; ``resume_from`` is such a state from an interrupted
    run, taken up by the train call with the same ``call`` number (a stage's first call is 0).
    """

    save: Callable[[dict], None]
    resume_from: dict | None = None
    calls: int = 0


def make_optimizer(params, cfg: Mapping) -> torch.optim.Optimizer:
    """The optimizer of complete settings (:class:`~approxrun.config.schema.OptimizerConfig`)."""
    name, lr, wd = cfg["name"], float(cfg["lr"]), float(cfg["weight_decay"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg["momentum"]), weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ApproxrunError(f"optimizer.name: unknown optimizer {name!r}, expected one of {', '.join(OPTIMIZERS)}")


def make_scheduler(optimizer, cfg: Mapping, epochs: int):
    """The LR schedule of complete settings (:class:`~approxrun.config.schema.SchedulerConfig`)."""
    name = cfg["name"]
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, int(cfg["step_size"]), float(cfg["gamma"]))
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(m) for m in cfg["milestones"]],
                                                    float(cfg["gamma"]))
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


def _restore_epoch_state(state: Mapping, model: nn.Module, optimizer, scheduler, loader_generator) -> tuple[list, int]:
    """Bring model, optimizer, LR schedule and random states to a saved epoch state; returns its
    history and the number of epochs done."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], loader_generator)
    return list(state["history"]), int(state["epoch"])


def _batch_loss(logits: torch.Tensor, y: torch.Tensor, dist: Distributed | None):
    """The loss to step on and the global batch's size, summed loss and correct count.

    Under several ranks each rank holds a share of the global batch: the share's summed loss is
    scaled so that DDP's gradient average is the global batch's mean.
    """
    if dist is None or not dist.active:
        loss = F.cross_entropy(logits, y)
        return loss, len(y), loss.item() * len(y), (logits.argmax(1) == y).sum().item()
    share_loss = F.cross_entropy(logits, y, reduction="sum")
    batch_size, batch_loss, batch_correct = dist.sum([len(y), share_loss.item(), (logits.argmax(1) == y).sum().item()])
    return share_loss * (dist.world_size / batch_size), batch_size, batch_loss, batch_correct


def train(model: nn.Module, train_loader, val_loader, stage_cfg: Mapping, device: torch.device,
          num_classes: int, params=None, extra_loss: Callable[[], torch.Tensor] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None, desc: str = "",
          progress: TrainingProgress | None = None, dist: Distributed | None = None) -> list[dict]:
    """Train for ``stage_cfg['epochs']`` epochs; returns one dict per epoch (loss, accuracies, lr).

    ``stage_cfg`` holds ``epochs``, ``optimizer`` and ``scheduler`` (schema defaults fill the rest).
    ``extra_loss`` is added to the cross-entropy at every step (e.g. the noise reward);
    ``on_epoch_end(epoch, record)`` may add entries to the epoch's record. With ``progress`` the
    state is saved at every epoch end and an interrupted call resumes (``on_epoch_end`` is not
    called again for the epochs it restores). With ``dist`` (several ranks) the loader yields this
    rank's share of each global batch, steps run through DistributedDataParallel and each share's
    loss is weighted so that the gradient is the global batch's mean.
    """
    settings = complete(TrainingConfig, {key: stage_cfg[key] for key in ("epochs", "optimizer", "scheduler")
                                         if stage_cfg.get(key) is not None})
    epochs = int(settings["epochs"])
    params = list(params if params is not None else (p for p in model.parameters() if p.requires_grad))
    optimizer = make_optimizer(params, settings["optimizer"])
    scheduler = make_scheduler(optimizer, settings["scheduler"], epochs)
    loader_generator = getattr(train_loader, "generator", None)
    step_model = dist.wrap(model) if dist is not None else model
    history, first_epoch, call, resume = [], 0, None, None
    if progress is not None:
        call, resume = progress.calls, progress.resume_from
        progress.calls += 1
    if resume is not None and resume["call"] == call:
        history, first_epoch = _restore_epoch_state(resume, model, optimizer, scheduler, loader_generator)
        log.info("%s: resuming after epoch %d/%d", desc, first_epoch, epochs)
    for epoch in range(first_epoch, epochs):
        model.train()
        start, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(train_loader, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                   disable=None if dist is None or dist.is_main else True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            loss, batch_size, batch_loss, batch_correct = _batch_loss(step_model(x), y, dist)
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
        if progress is not None:
            progress.save({"call": call, "epoch": epoch + 1, "model": model.state_dict(),
                              "optimizer": optimizer.state_dict(),
                              "scheduler": None if scheduler is None else scheduler.state_dict(),
                              "rng": rng_state(loader_generator), "history": history})
    return history
