"""The basic stages: FP32 baseline, quantization-aware training, approximate retraining, evaluation."""

from __future__ import annotations

import time
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
                    params=kwargs.pop("params", _weights(ctx)), desc=name, progress=ctx.progress, dist=ctx.dist,
                    **kwargs)
    return with_test_metrics(ctx, {"history": history, "epochs": len(history),
                                   "train_loss": history[-1]["train_loss"] if history else None})


def with_test_metrics(ctx: StageContext, metrics: dict, desc: str | None = None) -> dict:
    """Adds test accuracy and loss (and top-5 with more than 10 classes) to ``metrics``."""
    result = evaluate(ctx.model, ctx.loaders[2], ctx.device, ctx.data.num_classes, desc=desc, dist=ctx.dist)
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


def calibrate_observers(ctx: StageContext, batches: int) -> int:
    """Set the range of every activation quantizer that has none yet (float weights: a pretrained
    model) from ``batches`` training batches (test batches for an evaluation-only folder), with
    quantized exact products and the network in eval mode; returns the layers calibrated."""
    layers = [layer for _, layer in approx_layers(ctx.model) if not layer.act_quant.observer.initialized]
    if not layers or batches <= 0:
        return 0
    loader = ctx.loaders[0] if len(ctx.data.train) else ctx.loaders[2]
    set_mode(ctx.model, "quant")
    ctx.model.eval()
    for layer in layers:
        layer.act_quant.train()
    with torch.no_grad():
        for _, (x, _) in zip(range(batches), loader):
            ctx.model(x.to(ctx.device))
    for layer in layers:
        layer.act_quant.eval()
    ctx.log.info("calibrated the activation ranges of %d layers on %d batches", len(layers), batches)
    return len(layers)


@register("eval", EvalStage, uses_multiplier=True, cacheable=False)
def evaluate_weights(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Test accuracy (top-1, and top-5 beyond 10 classes) of the loaded weights (``model.weights`` or
    ``init_weights``) under the multiplier, without training; activation ranges the weights do not
    carry are calibrated first."""
    mode, batches = stage_cfg["mode"], stage_cfg["calibration_batches"]
    set_multiplier(ctx.model, ctx.multiplier)
    calibrated = calibrate_observers(ctx, batches) if mode != "float" else 0
    set_mode(ctx.model, mode)
    start = time.perf_counter()
    with torch.no_grad():
        metrics = with_test_metrics(ctx, {"epochs": 0, "mode": mode, "calibrated_layers": calibrated},
                                    desc=f"{stage_cfg['name']} ({mode}, {ctx.multiplier.name})")
    seconds = time.perf_counter() - start
    metrics["images_per_s"] = round(len(ctx.data.test) / seconds, 2) if seconds > 0 else None
    ctx.log.info("%s: %d test images, %.1f images/s, top-1 %.4f%s", stage_cfg["name"], len(ctx.data.test),
                 metrics["images_per_s"] or 0.0, metrics["test_accuracy"],
                 f", top-5 {metrics['test_top5']:.4f}" if "test_top5" in metrics else "")
    metrics["multipliers"] = {name: ctx.multiplier.name for name, _ in approx_layers(ctx.model)}
    return StageResult(metrics)
