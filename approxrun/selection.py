"""Multiplier selection math of agn-approx (E. Trommer, B. Waschneck, A. Kumar, "Combining Gradients
and Probabilities for Heterogeneous Approximation of Neural Networks", ICCAD 2022) as plain functions.

A layer output is E_ij = sum_k lut(a_ik, w_kj) over the fan_in (K) products of activation row i
and weight column j (codes; the zero-point correction passes the LUT's error through unchanged).
With the error table e(x, w) = lut(x, w) - x*w, the output error is sum_k e(a_ik, w_kj) times the
output scale. Its std over all outputs is predicted from a sample of the layer's operands, without
running the candidate, as a two-way decomposition into row, column and interaction parts:

- P_k, Q_k: histograms of the activation codes at position k (over the sampled inputs) and of the
  weight codes at position k (over the columns);
- m_k(x) = sum_w e(x, w) Q_k(w) and M_k(w) = sum_x P_k(x) e(x, w): mean error per product given one
  operand;
- row part: Var_i sum_k m_k(a_ik), over random rows (the mean error of a row, exact per row);
- column part: Var_j sum_k M_k(w_kj), over the actual weight columns (exact per column);
- interaction: sum_k E[r_k^2] with r_k = e - m_k(x) - M_k(w) + mean, under P_k x Q_k
  (= E e^2 - E m_k^2 - E M_k^2 + mean^2);
- groups (grouped convolutions) are pooled, adding the variance of the group means.

Why not the reference's pooling sqrt(K mean(s_i^2) + K^2 Var(mu_i)) with s_i^2 the variance of e
under one row's histogram times the global weight histogram: it treats the weights of a column
and the activations of a row as redrawn for every output. The first adds Var_x(m(x)) to every row
(over-prediction: +15..30 % for truncated and perforated designs on Gaussian data); the second
replaces the layer's real column biases by their expectation, off either way by up to 50 % for
layers with few output channels. Against running the layer (tests/test_selection.py) the
decomposition here is within a few percent on linear, convolutional and grouped layers.
The interaction part assumes the products of one output uncorrelated beyond the row and column
effects. On trained LeNet5 / Fashion-MNIST layers (neighbouring pixels and filter taps are
correlated) it predicted truncated, BAM and perforated designs within 5 % and DRUM designs
(relative errors) 10-17 % low; the reference pooling was off by -44 % to +27 % on the same layers.

The tolerated std of a layer is std(exact layer output) * |sigma| (sigma from the gradient
search); the cheapest candidate whose predicted std fits is chosen, the exact one when none fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from approxrun.energy import relative_cost
from approxrun.errors import ApproxrunError
from approxrun.layers import OperandRecord
from approxrun.lut import LUT_SIZE, code_to_index
from approxrun.multipliers.multiplier import Multiplier


@dataclass
class LayerSample:
    """What selection needs to know of one layer, from its operands on a sample of inputs.

    Operands are byte indices (:func:`approxrun.lut.code_to_index`), grouped as the LUT GEMM
    multiplies them (G groups, K = fan_in, N outputs per group).
    """

    p_act: np.ndarray  # [G, K, 256] activation histogram per position
    p_weight: np.ndarray  # [G, K, 256] weight histogram per position, over the columns
    rows: np.ndarray  # [G, R, K] sampled activation rows
    columns: np.ndarray  # [G, K, N] all weight columns
    output_scale: float  # float output per unit of the integer accumulator (RMS over channels)
    output_std: float  # std of the exact (quantized) layer output before bias, over all outputs

    @property
    def fan_in(self) -> int:
        return self.columns.shape[1]


def position_histograms(operands: torch.Tensor) -> np.ndarray:
    """[G, K, 256]: for codes [G, M, K], the fraction of the M entries at each position k per byte index."""
    idx = code_to_index(operands).transpose(1, 2)  # [G, K, M]
    counts = torch.zeros(*idx.shape[:2], LUT_SIZE, dtype=torch.float64)
    counts.scatter_add_(2, idx, torch.ones(idx.shape, dtype=torch.float64))
    return (counts / idx.shape[2]).numpy()


def error_variance(error: np.ndarray, sample: LayerSample) -> float:
    """Predicted variance of the layer's output error in accumulator units (see module docstring)."""
    variances, means = [], []
    positions = np.arange(sample.fan_in)
    for p, q, rows, columns in zip(sample.p_act, sample.p_weight, sample.rows, sample.columns):
        m = q @ error.T  # [K, 256]: m_k(x)
        big_m = p @ error  # [K, 256]: M_k(w)
        mean = (p * m).sum(1)  # [K]
        second = ((p @ error**2) * q).sum(1)
        interaction = second - (p * m**2).sum(1) - (q * big_m**2).sum(1) + mean**2
        row_means = m[positions, rows].sum(1)  # [R]
        column_means = big_m[positions[:, None], columns].sum(0)  # [N]
        variances.append(row_means.var() + column_means.var() + max(float(interaction.sum()), 0.0))
        means.append(mean.sum())
    return float(np.mean(variances) + np.var(means))


def predicted_error_std(sample: LayerSample, multiplier: Multiplier) -> float:
    """Predicted std of the layer's output error (float units) with ``multiplier``'s LUT."""
    return math.sqrt(error_variance(multiplier.error_table, sample)) * sample.output_scale


def tolerated_std(sample: LayerSample, sigma: float) -> float:
    """The output-error std the layer tolerates: std(exact output) * |sigma|."""
    return sample.output_std * abs(float(sigma))


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A per-tensor ([]) or per-output-channel ([O]) parameter shaped [G, 1, O/G] (or [])."""
    return t.double().reshape(groups, 1, -1) if t.dim() else t.double()


def exact_outputs(record: OperandRecord) -> torch.Tensor:
    """The exact layer output (float, before bias) of a record: (a - za)(w - zw) * scales, [G, M, N]."""
    groups = record.weights.shape[0]
    a = record.activations.double() - record.zp_a.double()
    w = record.weights.double() - _per_group(record.zp_w, groups)
    return (a @ w) * record.scale_a.double() * _per_group(record.scale_w, groups)


def layer_sample(records: Sequence[OperandRecord], rows: int, generator: torch.Generator | None = None) -> LayerSample:
    """A :class:`LayerSample` from a layer's recorded forward passes, with ``rows`` random rows
    (drawn with ``generator``; all when there are fewer)."""
    if not records:
        raise ValueError("no operands recorded for this layer")
    activations = torch.cat([r.activations for r in records], dim=1)
    picked = activations
    if activations.shape[1] > rows:
        picked = activations[:, torch.randperm(activations.shape[1], generator=generator)[:rows]]
    weights = records[0].weights
    outputs = torch.cat([exact_outputs(r).flatten() for r in records])
    first = records[0]
    scale = float(first.scale_a) * float(first.scale_w.double().pow(2).mean().sqrt())
    return LayerSample(position_histograms(activations), position_histograms(weights.transpose(1, 2)),
                       code_to_index(picked).numpy(), code_to_index(weights).numpy(), scale,
                       float(outputs.std(correction=0)))


def library_cost_kind(library: str, candidates: Sequence[Multiplier]) -> str:
    """The one cost kind ('power' or 'proxy') of the candidates; refuses missing or mixed costs."""
    missing = [m.name for m in candidates if m.cost is None]
    if missing:
        raise ApproxrunError(f"library {library}: no cost known for {', '.join(missing)}; "
                             "every candidate needs a power figure or a cost proxy")
    kinds = {m.cost.kind: m.name for m in candidates}
    if len(kinds) > 1:
        raise ApproxrunError(f"library {library}: mixes power ({kinds['power']}) and proxy ({kinds['proxy']}) "
                             "costs; use candidates with one kind of cost")
    return next(iter(kinds))


@dataclass
class LayerChoice:
    """The selection for one layer: tolerance, each candidate's predicted std, the pick and its cost."""

    layer: str
    share: float
    sigma: float
    tolerated: float
    predicted: dict[str, float] = field(default_factory=dict)
    chosen: str = ""
    relative_cost: float = 1.0

    def fits(self, name: str) -> bool:
        return self.predicted[name] <= self.tolerated


def choose(predicted: Mapping[str, float], tolerated: float, costs: Mapping[str, float], fallback: str) -> str:
    """The cheapest candidate whose predicted std is within the tolerance (ties: smaller std, then
    name); ``fallback`` (the exact multiplier) when none fits."""
    fitting = [name for name, std in predicted.items() if std <= tolerated]
    if not fitting:
        return fallback
    return min(fitting, key=lambda name: (costs[name], predicted[name], name))


def exact_candidate(library: str, candidates: Sequence[Multiplier]) -> Multiplier:
    """The library's exact multiplier (chosen where nothing else fits)."""
    for multiplier in candidates:
        if multiplier.is_exact:
            return multiplier
    raise ApproxrunError(f"library {library}: no exact multiplier among the candidates; add one "
                         "(it is chosen for layers that tolerate no candidate's error)")


def select_multipliers(samples: Mapping[str, LayerSample], sigmas: Mapping[str, float],
                       shares: Mapping[str, float], candidates: Sequence[Multiplier], exact_power_mw: float,
                       library: str = "library", forced: str | None = None) -> list[LayerChoice]:
    """One :class:`LayerChoice` per layer of ``samples``, choosing among ``candidates``; with ``forced``
    (a named multiplier: the only candidate) that one in every layer, with its predictions for the report."""
    if forced is None:
        library_cost_kind(library, candidates)
        exact = exact_candidate(library, candidates)
    costs = {m.name: relative_cost(m, exact_power_mw) for m in candidates}
    choices = []
    for name, sample in samples.items():
        choice = LayerChoice(name, float(shares[name]), float(sigmas[name]), tolerated_std(sample, sigmas[name]))
        choice.predicted = {m.name: predicted_error_std(sample, m) for m in candidates}
        choice.chosen = forced or choose(choice.predicted, choice.tolerated, costs, exact.name)
        choice.relative_cost = costs[choice.chosen] if costs[choice.chosen] is not None else float("nan")
        choices.append(choice)
    return choices
