"""The agn-approx stages: ``gradient`` learns how much output noise each layer tolerates, ``select``
picks the cheapest multiplier per layer within that tolerance (math in :mod:`approxrun.selection`).

Stage settings: :class:`~approxrun.config.schema.GradientStage` and
:class:`~approxrun.config.schema.SelectStage` (types, defaults, ranges).
"""

from __future__ import annotations

import csv
import io
from typing import Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from approxrun.config.schema import GradientStage, SelectStage
from approxrun.energy import opcount_shares, relative_energy
from approxrun.errors import ApproxrunError, ConfigError
from approxrun.layers import approx_layers, count_ops, record_operands, set_mode
from approxrun.multipliers import AUTO
from approxrun.multipliers.multiplier import Multiplier
from approxrun.selection import (LayerChoice, LayerSample, layer_sample, library_cost_kind, predicted_error_std,
                                 select_multipliers, tolerated_std)
from approxrun.stages import StageContext, StageResult, register
from approxrun.stages.training_stages import with_test_metrics, train_and_test
from approxrun.utils.files import atomic_write_text
from approxrun.utils.plots import plt, save_figure

RECORD_ROWS = 1 << 14  # activation rows kept per layer and batch while recording (bounds memory)


def layer_shares(ctx: StageContext) -> dict[str, float]:
    """Opcount share of every approximable layer (one forward pass if the opcounts are not known yet)."""
    layers = approx_layers(ctx.model)
    opcounts = {name: layer.opcount for name, layer in layers}
    if any(count is None for count in opcounts.values()):
        opcounts = count_ops(ctx.model, ctx.data.train[0][0].unsqueeze(0).to(ctx.device))
    return opcount_shares(opcounts)


def noise_reward(sigmas: Mapping[str, torch.Tensor], shares: Mapping[str, float], sigma_max: float) -> torch.Tensor:
    """sum_l share_l * min(|sigma_l|, sigma_max): the reward for tolerating noise, saturating at sigma_max."""
    return sum(shares[name] * torch.clamp(sigma.abs(), max=sigma_max) for name, sigma in sigmas.items())


def record_samples(ctx: StageContext, stage_cfg: Mapping) -> dict[str, LayerSample]:
    """Each layer's :class:`LayerSample` from its quantized operands on ``sample_size`` training images.

    The images and rows are drawn with the run's seed, so the result is deterministic.
    """
    sample_size, rows = stage_cfg["sample_size"], stage_cfg["rows"]
    generator = torch.Generator().manual_seed(int(ctx.config.get("seed", 0)))
    indices = torch.randperm(len(ctx.data.train), generator=generator)[:sample_size].tolist()
    batch_size = int(ctx.config["dataset"].get("eval_batch_size", 256))
    loader = DataLoader(Subset(ctx.data.train, indices), batch_size=batch_size)
    layers = approx_layers(ctx.model)
    modes = {name: layer.mode for name, layer in layers}
    was_training = ctx.model.training
    set_mode(ctx.model, "quant")
    ctx.model.eval()
    try:
        with torch.no_grad(), record_operands(ctx.model, RECORD_ROWS, generator) as records:
            for x, _ in loader:
                ctx.model(x.to(ctx.device))
    finally:
        for name, layer in layers:
            layer.set_mode(modes[name])
        ctx.model.train(was_training)
    return {name: layer_sample(records[name], rows, generator) for name, _ in layers}


def _csv(header: list, rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _plot_sigma(history: list[dict[str, float]], initial: float, sigma_max: float, path) -> None:
    names = list(history[-1])
    x = np.arange(len(names))
    fig, (ax_bar, ax_line) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_bar.bar(x, [abs(history[-1][n]) for n in names])
    ax_bar.axhline(sigma_max, color="black", linestyle="--", label=f"sigma_max {sigma_max:g}")
    ax_bar.set_xticks(x, names, rotation=45, ha="right")
    ax_bar.set(ylabel="|sigma| (tolerated noise / output std)", title="learned noise tolerance per layer")
    ax_bar.legend()
    epochs = np.arange(len(history) + 1)
    for name in names:
        ax_line.plot(epochs, [abs(initial)] + [abs(h[name]) for h in history], marker="o", label=name)
    ax_line.set(xlabel="epoch (0: initial_noise)", ylabel="|sigma|", title="|sigma| per epoch")
    ax_line.xaxis.get_major_locator().set_params(integer=True)
    ax_line.legend(fontsize="small")
    for ax in (ax_bar, ax_line):
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_selection(choices: list[LayerChoice], network: float, cost_kind: str, path) -> None:
    """Relative cost of each layer's pick (line: the network's) and each layer's opcount share."""
    names = [c.layer for c in choices]
    x = np.arange(len(names))
    fig, (ax_cost, ax_share) = plt.subplots(2, 1, figsize=(max(4.0, 0.8 * len(names) + 1.5), 6.5), sharex=True)
    ax_cost.bar(x, [c.relative_cost for c in choices])
    for xi, c in zip(x, choices):
        ax_cost.text(xi, c.relative_cost, c.chosen, ha="center", va="bottom", fontsize="x-small", rotation=90)
    ax_cost.axhline(network, color="black", label=f"network {network:.3f}")
    ax_cost.set(ylabel="relative power" if cost_kind == "power" else "relative cost (proxy)", ylim=(0, 1.25))
    ax_cost.legend()
    ax_share.bar(x, [c.share for c in choices], color="orange")
    ax_share.set_xticks(x, names, rotation=45, ha="right")
    ax_share.set(ylabel="relative opcount")
    save_figure(fig, path)


def multiplier_fit(samples: Mapping[str, LayerSample], sigmas: Mapping[str, float],
                   multiplier: Multiplier) -> dict[str, dict]:
    """Per layer: the multiplier's predicted output-error std, the tolerated std, and whether it fits."""
    report = {}
    for name, sample in samples.items():
        predicted, tolerated = predicted_error_std(sample, multiplier), tolerated_std(sample, sigmas[name])
        report[name] = {"predicted_std": predicted, "tolerated_std": tolerated, "fits": predicted <= tolerated}
    return report


@register("gradient", GradientStage, uses_multiplier=True)
def gradient(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Noise-aware training with a learnable noise scale sigma per layer (agn-approx gradient search).

    Loss = cross-entropy - lmbd * sum_l share_l * min(|sigma_l|, sigma_max). With a non-exact
    ``multiplier`` the report also says, per layer, whether its predicted error fits the tolerance
    (which is why the multiplier is part of this stage's cache key).
    """
    lmbd, sigma_max, initial = stage_cfg["lmbd"], stage_cfg["sigma_max"], stage_cfg["initial_noise"]
    shares = layer_shares(ctx)
    layers = approx_layers(ctx.model)
    sigmas = {name: layer.sigma for name, layer in layers}
    with torch.no_grad():
        for sigma in sigmas.values():
            sigma.fill_(initial)
    set_mode(ctx.model, "noise")
    history: list[dict[str, float]] = []

    def log_sigma(epoch: int, record: dict) -> None:
        values = {name: sigma.item() for name, sigma in sigmas.items()}
        history.append(values)
        record["sigma"] = values
        for name, value in values.items():
            ctx.log.info("gradient epoch %d | layer %s | sigma %+.4f", epoch + 1, name, value)

    sigma_ids = {id(sigma) for sigma in sigmas.values()}
    weights = [p for p in ctx.model.parameters() if p.requires_grad and id(p) not in sigma_ids]
    # sigma in its own group without weight decay (decay would pull the tolerances to 0)
    params = [{"params": weights}, {"params": list(sigmas.values()), "weight_decay": 0.0}]
    metrics = train_and_test(ctx, stage_cfg, stage_cfg["name"], params=params, on_epoch_end=log_sigma,
                              extra_loss=lambda: -lmbd * noise_reward(sigmas, shares, sigma_max))
    final = {name: sigma.item() for name, sigma in sigmas.items()}
    history = history or [final]
    metrics.update(lmbd=lmbd, sigma_max=sigma_max, initial_noise=initial, sigma=final, sigma_history=history)
    atomic_write_text(ctx.artifact_dir / "sigma.csv", _csv(
        ["layer", "opcount_share"] + [f"sigma_epoch_{i + 1}" for i in range(len(history))] + ["abs_sigma"],
        [[name, f"{shares[name]:.6f}"] + [f"{h[name]:.6f}" for h in history] + [f"{abs(final[name]):.6f}"]
         for name in final]))
    _plot_sigma(history, initial, sigma_max, ctx.artifact_dir / "sigma.png")
    if not ctx.multiplier.is_exact:
        fit = multiplier_fit(record_samples(ctx, stage_cfg), final, ctx.multiplier)
        metrics["multiplier_fit"] = {"multiplier": ctx.multiplier.name, "layers": fit}
        atomic_write_text(ctx.artifact_dir / "multiplier_fit.csv", _csv(
            ["layer", "multiplier", "predicted_std", "tolerated_std", "fits"],
            [[name, ctx.multiplier.name, f"{f['predicted_std']:.6g}", f"{f['tolerated_std']:.6g}",
              "yes" if f["fits"] else "no"] for name, f in fit.items()]))
        for name, f in fit.items():
            ctx.log.info("%s on layer %s: predicted error std %.4g, tolerated %.4g: %s", ctx.multiplier.name, name,
                         f["predicted_std"], f["tolerated_std"], "fits" if f["fits"] else "does not fit")
    return StageResult(metrics, {"sigma": final})


def _check_domains(library: str, candidates: list[Multiplier], ctx: StageContext) -> None:
    """Candidates must take the operand codes the layers were quantized to (recorded operands)."""
    for name, layer in approx_layers(ctx.model):
        dom_a, dom_b = layer.act_quant.domain, layer.weight_quant.domain
        for m in candidates:
            if (m.domain_a.signed, m.domain_b.signed) != (dom_a.signed, dom_b.signed) or \
                    m.domain_a.bits < dom_a.bits or m.domain_b.bits < dom_b.bits:
                raise ApproxrunError(f"library {library}: {m.name} takes {m.domain_a} x {m.domain_b} operands, but "
                                     f"layer {name} is quantized to {dom_a} x {dom_b} (from multiplier="
                                     f"{ctx.multiplier.name})")


@register("select", SelectStage, uses_multiplier=True)
def select(ctx: StageContext, stage_cfg: Mapping) -> StageResult:
    """Per layer, the cheapest ``library`` multiplier whose predicted error std fits the learned tolerance;
    with a named run multiplier (``multiplier`` setting not ``auto``) that one in every layer.

    The stage config carries ``library`` and ``exact_power_mw`` (interpolated from the run's config)
    so that they are part of the stage's cache key. Writes ``assignment.csv`` and ``selection.png``;
    reports the test accuracy with the picks deployed (before retraining) and the network's relative
    energy; passes the assignment on.
    """
    sigmas = ctx.state.get("sigma")
    if not sigmas:
        raise ConfigError(f"stage {stage_cfg['name']}: needs the noise tolerances of a gradient stage earlier "
                             "in the schedule (schedule agn: baseline, quant, gradient, select, approx)")
    where = f"schedule.stages.{stage_cfg['name']}"
    library, exact_power = stage_cfg.get("library"), stage_cfg.get("exact_power_mw")
    if not isinstance(library, Mapping) or not isinstance(exact_power, (int, float)):
        raise ConfigError(f"{where}: needs 'library' and 'exact_power_mw' (set them to ${{library}} and "
                             "${energy.exact_power_mw} as conf/schedule/agn.yaml does)")
    library_name, names = library.get("name", "library"), list(library.get("multipliers") or [])
    named = stage_cfg.get("multiplier", AUTO) != AUTO  # multiplier=X: X in every layer, no choice
    if named:
        library_name, candidates = f"multiplier={ctx.multiplier.name}", [ctx.multiplier]
    elif not names:
        raise ConfigError(f"library {library_name}: 'multipliers' lists no candidates")
    else:
        candidates = [ctx.resolve_multiplier(name) for name in names]
    _check_domains(library_name, candidates, ctx)
    shares = layer_shares(ctx)
    samples = record_samples(ctx, stage_cfg)
    choices = select_multipliers(samples, sigmas, shares, candidates, exact_power, library_name,
                                 forced=ctx.multiplier.name if named else None)
    by_name = {m.name: m for m in candidates}
    chosen = {c.layer: by_name[c.chosen] for c in choices}
    network = relative_energy(shares, chosen, exact_power)
    for c in choices:
        ctx.log.info("layer %s: sigma %.4f, tolerated std %.4g, chose %s (relative cost %.3f, predicted std %.4g)",
                     c.layer, c.sigma, c.tolerated, c.chosen, c.relative_cost, c.predicted[c.chosen])
    ctx.log.info("relative energy of the assignment: %s", "unknown (no cost)" if network is None else f"{network:.4f}")
    atomic_write_text(ctx.artifact_dir / "assignment.csv", _csv(
        ["layer", "opcount_share", "sigma", "tolerated_std"] + [f"predicted_std:{n}" for n in by_name]
        + ["chosen", "cost"],
        [[c.layer, f"{c.share:.6f}", f"{c.sigma:.6f}", f"{c.tolerated:.6g}"]
         + [f"{c.predicted[n]:.6g}" for n in by_name] + [c.chosen, f"{c.relative_cost:.6f}"] for c in choices]))
    if network is not None:
        _plot_selection(choices, network, library_cost_kind(library_name, candidates),
                        ctx.artifact_dir / "selection.png")
    layers = dict(approx_layers(ctx.model))
    for name, multiplier in chosen.items():
        layers[name].set_multiplier(multiplier)
    set_mode(ctx.model, "approx")
    with torch.no_grad():
        metrics = with_test_metrics(ctx, {"epochs": 0})
    assignment = {name: m.name for name, m in chosen.items()}
    metrics.update(library=library_name, relative_energy=network, multipliers=assignment,
                   layers={c.layer: {"share": c.share, "sigma": c.sigma, "tolerated_std": c.tolerated,
                                     "chosen": c.chosen, "relative_cost": c.relative_cost,
                                     "predicted_std": c.predicted} for c in choices})
    return StageResult(metrics, {"assignment": assignment})
