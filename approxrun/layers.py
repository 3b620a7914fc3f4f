"""Approximate Linear and Conv2d layers, model conversion, and helpers to set mode and multiplier.

Each layer runs in one of four modes:
- ``float``: the plain float layer;
- ``quant``: fake-quantized operands, exact products (quantization-aware training);
- ``noise``: ``quant`` plus Gaussian noise N(0, 1) * std(y) * sigma in training (sigma is learnable);
- ``approx``: every product through the multiplier's LUT, exactly, on the integer codes.
Bias is always added in float after dequantization (and after the noise).
"""

from __future__ import annotations

import fnmatch
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from approxrun.lut import OperandDomain
from approxrun.multipliers.multiplier import Multiplier
from approxrun.ops import grouped_columns, grouped_rows, lut_conv2d, lut_matmul
from approxrun.ops.im2col import conv_output_size, tap_slice
from approxrun.quant import ActivationQuantizer, WeightQuantizer, zero_point_corrected

MODES = ("float", "quant", "noise", "approx")
log = logging.getLogger(__name__)


class ApproxLayer:
    """Behaviour shared by :class:`ApproxLinear` and :class:`ApproxConv2d` (a mixin)."""

    _recording: "_Recording | None" = None  # set inside :func:`record_operands`

    def _init_approx(self, multiplier: Multiplier | None, bits_a: int | None, bits_b: int | None,
                     observer: str, per_channel: bool, grad: str, initial_noise: float,
                     activations: str = "affine") -> None:
        self.mode = "float"
        self.grad = grad
        self.bits_a, self.bits_b = bits_a, bits_b
        self.opcount: int | None = None
        self.sigma = nn.Parameter(torch.tensor(float(initial_noise)))
        multiplier = multiplier or Multiplier.exact()
        self.act_quant = ActivationQuantizer(self._domain(multiplier.domain_a, bits_a), observer, activations)
        self.weight_quant = WeightQuantizer(self._domain(multiplier.domain_b, bits_b), per_channel)
        self.multiplier = multiplier

    @staticmethod
    def _domain(domain: OperandDomain, bits: int | None) -> OperandDomain:
        return domain if bits is None else domain.narrowed(bits)

    def set_multiplier(self, multiplier: Multiplier) -> None:
        """Use ``multiplier``; quantizer domains follow its operand domains (signedness, bits)."""
        self.multiplier = multiplier
        self.act_quant.domain = self._domain(multiplier.domain_a, self.bits_a)
        self.weight_quant.domain = self._domain(multiplier.domain_b, self.bits_b)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def get_extra_state(self):
        return {"mode": self.mode, "multiplier": self.multiplier.name}

    def set_extra_state(self, state) -> None:
        """Restores the mode; the multiplier is a choice of the caller (set it with set_multiplier)."""
        self.set_mode(state["mode"])
        if state.get("multiplier") != self.multiplier.name:
            log.debug("state saved with multiplier %s; this layer keeps %s until set_multiplier",
                      state.get("multiplier"), self.multiplier.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "float":
            return self._float_forward(x)
        codes_a, scale_a, zp_a, x_q = self.act_quant(x)
        codes_w, scale_w, zp_w, w_q = self.weight_quant(self.weight)
        if self._recording is not None:
            self._recording.add(self, codes_a, codes_w, scale_a, zp_a, scale_w, zp_w)
        if self.mode == "approx" and self.grad == "lut":  # LUT-derived gradients through the LUT op
            return self._add_bias(self._approx_forward(codes_a, codes_w, scale_a, zp_a, scale_w, zp_w).to(x.dtype))
        if self.mode == "approx":
            # straight-through: the LUT's value forward, the exact quantized product's gradient
            # backward, without an autograd graph through the LUT op
            with torch.no_grad():
                y_lut = self._approx_forward(codes_a, codes_w, scale_a, zp_a, scale_w, zp_w)
            x_q, padding = self._product_input(x_q)
            return self._add_bias(_StraightThrough.apply(x_q, w_q, y_lut, self, padding))
        y = self._product(x_q, w_q)
        if self.mode == "noise" and self.training:
            y = y + torch.randn_like(y) * y.std() * self.sigma
        return self._add_bias(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, multiplier={self.multiplier.name}"


class _StraightThrough(torch.autograd.Function):
    """Forward: the LUT's value ``y_lut`` in the dtype of ``x_q``; backward: the gradients of the
    exact quantized product of ``x_q`` and ``w_q`` (``layer._product_grads``), computed directly:
    the float product itself never runs (it was 6% of a digits LeNet5 approx epoch, profiled)."""

    @staticmethod
    def forward(ctx, x_q: torch.Tensor, w_q: torch.Tensor, y_lut: torch.Tensor, layer, padding) -> torch.Tensor:
        ctx.save_for_backward(x_q, w_q)
        ctx.layer, ctx.padding = layer, padding
        return y_lut.to(x_q.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_q, w_q = ctx.saved_tensors
        grad_x, grad_w = ctx.layer._product_grads(x_q, w_q, grad, ctx.padding, ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None, None


class ApproxLinear(ApproxLayer, nn.Linear):
    """nn.Linear whose products can run through an approximate multiplier (any leading dims)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, multiplier=None,
                 bits_a=None, bits_b=None, observer: str = "ema", per_channel: bool = False,
                 grad: str = "ste", initial_noise: float = 0.1, activations: str = "affine", device=None,
                 dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_approx(multiplier, bits_a, bits_b, observer, per_channel, grad, initial_noise, activations)
        self.opcount = in_features * out_features

    @property
    def fan_in(self) -> int:
        return self.in_features

    def _float_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def _product(self, x, w):
        return F.linear(x, w)

    def _product_input(self, x):
        return x, None

    def _product_grads(self, x, w, grad, padding, needs):
        """Gradients of ``F.linear(x, w)`` for the output gradient ``grad`` (None where not needed)."""
        grad_x = grad @ w if needs[0] else None
        grad_w = grad.reshape(-1, self.out_features).t() @ x.reshape(-1, self.in_features) if needs[1] else None
        return grad_x, grad_w

    def _add_bias(self, y):
        return y if self.bias is None else y + self.bias

    def _operand_matrices(self, codes_a, zp_a, codes_w):
        """Activation rows [1, M, in] and weight columns [1, in, out]: the operands of each product."""
        return codes_a.reshape(1, -1, self.in_features), codes_w.t().unsqueeze(0)

    def _approx_forward(self, codes_a, codes_w, scale_a, zp_a, scale_w, zp_w):
        lead = codes_a.shape[:-1]
        a = codes_a.reshape(-1, self.in_features)
        acc = lut_matmul(a, codes_w.t(), self.multiplier.engine, grad=self.grad)  # float64 [M, O]
        sum_a = None if self.weight_quant.symmetric else a.sum(1, keepdim=True).double()
        exact = zero_point_corrected(acc, sum_a, codes_w.sum(1).double(),
                                     self.in_features, zp_a.double(), zp_w.double())
        return exact.mul_((scale_a * scale_w).double()).reshape(*lead, self.out_features)


class ApproxConv2d(ApproxLayer, nn.Conv2d):
    """nn.Conv2d (stride, padding and padding modes, dilation, groups) with approximate products."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", multiplier=None,
                 bits_a=None, bits_b=None, observer: str = "ema", per_channel: bool = False,
                 grad: str = "ste", initial_noise: float = 0.1, activations: str = "affine", device=None,
                 dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           bias, padding_mode, device=device, dtype=dtype)
        self._init_approx(multiplier, bits_a, bits_b, observer, per_channel, grad, initial_noise, activations)

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * math.prod(self.kernel_size)

    def _count_ops(self, y: torch.Tensor) -> None:
        self.opcount = self.fan_in * self.out_channels * y.shape[-2] * y.shape[-1]

    def _float_forward(self, x):
        y = self._conv_forward(x, self.weight, self.bias)
        self._count_ops(y)
        return y

    def _product(self, x, w):
        y = self._conv_forward(x, w, None)
        self._count_ops(y)
        return y

    def _product_input(self, x):
        """x and the padding of the convolution _product_grads differentiates: padding other than
        symmetric zeros (a padding mode, or "same" with an even kernel) is applied here, under autograd."""
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return x, self.padding
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0, 0)

    def _product_grads(self, x, w, grad, padding, needs):
        """Gradients of the convolution of x and w (``padding``, the layer's other options) for the
        output gradient ``grad`` (None where not needed): the kernel autograd runs for a conv2d."""
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, w, None, self.stride, padding, self.dilation, False, (0, 0), self.groups,
            (needs[0], needs[1], False))
        return grad_x, grad_w

    def _add_bias(self, y):
        return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)

    def _pad(self, codes: torch.Tensor, zero_code: torch.Tensor) -> torch.Tensor:
        """Explicit padding of the codes; zero padding uses the code of real 0."""
        pad = self._reversed_padding_repeated_twice
        if not any(pad):
            return codes
        if self.padding_mode == "zeros":
            return F.pad(codes, pad, value=float(zero_code))
        return F.pad(codes, pad, mode=self.padding_mode)

    def _operand_matrices(self, codes_a, zp_a, codes_w):
        """Unfolded activation rows [G, B*L, fan_in] (padded like the approx path) and weight columns
        [G, fan_in, O/G], grouped as :func:`approxrun.ops.lut_conv2d` multiplies them."""
        rows = grouped_rows(self._pad(codes_a, zp_a), self.kernel_size, self.stride, self.dilation, self.groups)
        return rows, grouped_columns(codes_w, self.groups)

    def _window_sums(self, padded: torch.Tensor) -> torch.Tensor:
        """Sum of the (padded) activation codes under each window, per group: [B, G, Ho, Wo]; exact
        (integer sums below 2**24 in float32). Box sums by strided slice adds over the channel sums,
        kernel-size taps along each axis in turn (LeNet5's first layer at batch 128: 126 us, against
        477 for a sum pool and 312 for a conv with ones)."""
        batch, channels, height, width = padded.shape
        sums = padded.reshape(batch, self.groups, channels // self.groups, height, width).sum(2)
        for dim, kernel, stride, dilation in zip((2, 3), self.kernel_size, self.stride, self.dilation):
            out_size = conv_output_size(sums.shape[dim], kernel, stride, 0, dilation)
            index = [slice(None)] * sums.dim()
            index[dim] = tap_slice(0, out_size, stride, dilation)
            box = sums[tuple(index)].clone()
            for tap in range(1, kernel):
                index[dim] = tap_slice(tap, out_size, stride, dilation)
                box += sums[tuple(index)]
            sums = box
        return sums

    def _approx_forward(self, codes_a, codes_w, scale_a, zp_a, scale_w, zp_w):
        padded = self._pad(codes_a, zp_a)
        acc = lut_conv2d(padded, codes_w, self.multiplier.engine, self.stride, 0, self.dilation, self.groups,
                         grad=self.grad)
        self._count_ops(acc)
        batch, _, height, width = acc.shape
        by_group = (batch, self.groups, self.out_channels // self.groups, height, width)
        per_channel = (1, *by_group[1:3], 1, 1)  # output channel o = (group, index in group)

        def channels(t: torch.Tensor) -> torch.Tensor:  # per-tensor or per-output-channel value
            return t.double().expand(self.out_channels).reshape(per_channel)

        # symmetric weights (zero point 0): the activations' window sums drop out of the correction
        sum_a = None if self.weight_quant.symmetric else self._window_sums(padded).double().unsqueeze(2)
        exact = zero_point_corrected(acc.reshape(by_group), sum_a,
                                     channels(codes_w.sum((1, 2, 3))), self.fan_in, zp_a.double(), channels(zp_w))
        return exact.mul_(channels(scale_a * scale_w)).reshape(acc.shape)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def approximate(model: nn.Module, skip: Iterable[str] = (), multiplier: Multiplier | None = None,
                **layer_kwargs) -> nn.Module:
    """Replace every nn.Linear / nn.Conv2d of ``model`` (in place) by its approximate layer.

    Weights and biases are kept. ``skip`` holds module names or glob patterns left as they are.
    ``layer_kwargs`` go to the layers (bits_a, bits_b, observer, per_channel, grad, initial_noise,
    activations: the activation scheme, affine or symmetric).
    """
    skip = tuple(skip)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, ApproxLayer) or _matches(full, skip):
                continue
            replacement = _convert(child, multiplier, layer_kwargs)
            if replacement is not None:
                setattr(module, child_name, replacement)
    return model


def _convert(module: nn.Module, multiplier, kwargs) -> nn.Module | None:
    if type(module) is nn.Linear:
        new = ApproxLinear(module.in_features, module.out_features, module.bias is not None,
                           multiplier=multiplier, device=module.weight.device, dtype=module.weight.dtype,
                           **kwargs)
    elif type(module) is nn.Conv2d:
        new = ApproxConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, module.groups, module.bias is not None,
                           module.padding_mode, multiplier=multiplier, device=module.weight.device,
                           dtype=module.weight.dtype, **kwargs)
    else:
        return None
    with torch.no_grad():
        new.weight.copy_(module.weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    new.train(module.training)
    return new


def approx_layers(model: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, ApproxLayer]]:
    """(name, layer) of every approximate layer, optionally only those matching names/patterns."""
    patterns = None if names is None else tuple(names)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, ApproxLayer) and (patterns is None or _matches(n, patterns))]


def set_mode(model: nn.Module, mode: str, names: Iterable[str] | None = None) -> None:
    for _, layer in approx_layers(model, names):
        layer.set_mode(mode)


def set_multiplier(model: nn.Module, multiplier, names: Iterable[str] | None = None, *, signed_a: bool = True,
                   signed_b: bool = True) -> None:
    """Use ``multiplier`` in the approximate layers (all, or those ``names`` match): a
    :class:`Multiplier`, or a raw 256x256 array/tensor ``lut[a][w]`` in the byte-indexed convention
    with operand signedness ``signed_a`` (activation), ``signed_b`` (weight); one multiplier (one
    engine, one analysis of the table) is shared by every layer."""
    if not isinstance(multiplier, Multiplier):
        multiplier = Multiplier.from_table(multiplier, signed_a, signed_b)
    for _, layer in approx_layers(model, names):
        layer.set_multiplier(multiplier)


def freeze_quantizers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) observer updates: calibrate first, then freeze."""
    for _, layer in approx_layers(model):
        layer.act_quant.observer.frozen.fill_(frozen)


@torch.no_grad()
def count_ops(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Run one forward pass (eval mode) so conv layers know their output size; name -> opcount."""
    was_training = model.training
    model.eval()
    model(example)
    model.train(was_training)
    return {name: layer.opcount for name, layer in approx_layers(model)}


@dataclass
class OperandRecord:
    """A layer's integer operands in one forward pass, grouped as the LUT GEMM multiplies them.

    ``activations`` [G, M, fan_in] and ``weights`` [G, fan_in, N] hold codes (int16); output
    element (m, n) of group g is sum_k activations[g, m, k] * weights[g, k, n] before the
    zero-point correction. Scales and zero points are the quantizers' (per tensor or per channel).
    """

    activations: torch.Tensor
    weights: torch.Tensor
    scale_a: torch.Tensor
    zp_a: torch.Tensor
    scale_w: torch.Tensor
    zp_w: torch.Tensor


class _Recording:
    def __init__(self, max_rows: int | None, generator: torch.Generator | None):
        self.max_rows, self.generator = max_rows, generator
        self.records: dict[ApproxLayer, list[OperandRecord]] = {}

    @torch.no_grad()
    def add(self, layer: ApproxLayer, codes_a, codes_w, scale_a, zp_a, scale_w, zp_w) -> None:
        rows, columns = layer._operand_matrices(codes_a.detach(), zp_a, codes_w.detach())
        if self.max_rows is not None and rows.shape[1] > self.max_rows:
            keep = torch.randperm(rows.shape[1], generator=self.generator)[: self.max_rows]
            rows = rows[:, keep.to(rows.device)]
        self.records.setdefault(layer, []).append(OperandRecord(
            rows.to(torch.int16).cpu(), columns.to(torch.int16).cpu(), scale_a.detach().cpu(),
            zp_a.detach().cpu(), scale_w.detach().cpu(), zp_w.detach().cpu()))


@contextmanager
def record_operands(model: nn.Module, max_rows: int | None = None,
                    generator: torch.Generator | None = None) -> Iterator[dict[str, list[OperandRecord]]]:
    """Capture every approximate layer's operand codes during forward passes in a quantized mode.

    Yields a dict, filled when the block ends: layer name -> one :class:`OperandRecord` per forward
    pass. ``max_rows`` keeps that many random activation rows per pass (drawn with ``generator``)
    to bound memory.
    """
    layers = approx_layers(model)
    recording = _Recording(max_rows, generator)
    result: dict[str, list[OperandRecord]] = {}
    for _, layer in layers:
        layer._recording = recording
    try:
        yield result
    finally:
        for name, layer in layers:
            layer._recording = None
            result[name] = recording.records.get(layer, [])
