"""The basic stages: FP32 baseline, quantization-aware training, approximate retraining, evaluation."""

from __future__ import annotations

from typing import Mapping

import torch

from approxrun.config.schema import EvalStage
from approxrun.layers import approx_layers, set_mode, set_multiplier
from approxrun.stages import StageContext, StageResult, register
from approxrun.training import evaluate, train


def _weights(ctx: StageContext):
    """Trainable parameters except the noise scales (those train only in the gradient stage)."""
    sigmas = {id(layer.sigma) for _, layer in approx_layers(ctx.model)}
    return [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in sigmas]


def train_and_test(ctx: StageContext, stage_cfg: Mapping, name: str, **kwargs) -> dict:
    """Train for the stage's epochs (``kwargs`` go to :func:`train`), then add test metrics."""
    train_loader, val_loader, test_loader = ctx.loaders
    history = train(ctx.model, train_loader, val_loader, stage_cfg, ctx.device, ctx.data.num_classes,
                    params=kwargs.pop("params", _weights(ctx)), desc=name, progress=ctx.progress, **kwargs)
    return with_test_metrics(ctx, {"history": history, "epochs": len(history),
                                   "train_loss": history[-1]["train_loss"] if history else None})


def with_test_metrics(ctx: StageContext, metrics: dict) -> dict:
    """Adds test accuracy and loss (and top-5 with more than 10 classes) to ``metrics``."""
    result = evaluate(ctx.model, ctx.loaders[2], ctx.device, ctx.data.num_classes)
    metrics.update(test_accuracy=result["accuracy"], test_loss=result["loss"])
    if "top5" in result:
        metrics["test_top5"] = result["top5"]
    return metrics


@register("baseline")
def baseline(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """FP32 training of the model as it is."""
    set_mode(ctx.model, "float")
    return StageResult(train_and_test(ctx, stage_cfg, stage_cfg["name"]))


@register("quant")
def quant(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Quantization-aware training with exact products (observers calibrate on the first batches)."""
    set_mode(ctx.model, "quant")
    return StageResult(train_and_test(ctx, stage_cfg, stage_cfg["name"]))


def apply_assignment(ctx: StageContext) -> dict:
    """Set each layer's multiplier: the per-layer assignment of an earlier stage, else the uniform one.

    Returns layer name -> multiplier.
    """
    assignment = ctx.state.get("assignment")
    chosen = {}
    for name, layer in approx_layers(ctx.model):
        multiplier = ctx.resolve_multiplier(assignment[name]) if assignment else ctx.multiplier
        layer.set_multiplier(multiplier)
        chosen[name] = multiplier
    return chosen


@register("approx", uses_multiplier=True)
def approx(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Retraining with every product through the multiplier's LUT (per-layer after a selection)."""
    chosen = apply_assignment(ctx)
    set_mode(ctx.model, "approx")
    metrics = train_and_test(ctx, stage_cfg, stage_cfg["name"])
    metrics["multipliers"] = {name: m.name for name, m in chosen.items()}
    return StageResult(metrics)


@register("eval", EvalStage, uses_multiplier=True, cacheable=False)
def evaluate_weights(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Test accuracy of the initial weights (``init_weights``) under the multiplier, without training."""
    mode = stage_cfg["mode"]
    set_multiplier(ctx.model, ctx.multiplier)
    set_mode(ctx.model, mode)
    with torch.no_grad():
        metrics = with_test_metrics(ctx, {"epochs": 0, "mode": mode})
    metrics["multipliers"] = {name: ctx.multiplier.name for name, _ in approx_layers(ctx.model)}
    return StageResult(metrics)
