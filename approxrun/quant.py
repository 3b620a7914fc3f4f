"""Quantization arithmetic, in one place: quantization parameters, fake quantization with
straight-through gradients, observers, and the exact zero-point correction of an integer GEMM.

Activations are affine (``affine``: a zero point, the range always includes 0; ReLU zero -> the lowest
code) or ``symmetric`` (zero point 0: non-negative activations on codes 0..127 of a signed domain or
0..255 of an unsigned one, as agn-approx/TorchApprox quantize; an input with negative values on an
unsigned domain keeps a zero point, since zero point 0 would clip its negative half away). Their
range comes from an observer, or is learned (``pact``: a clipping bound alpha trained with the
weights). Weights are symmetric per tensor or per output channel, or affine when the multiplier's B
operand is unsigned. Codes always lie in the operand domain the quantizer was given.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from approxrun.lut import OperandDomain

OBSERVERS = ("minmax", "ema", "percentile", "mse", "pact")
ACTIVATION_SCHEMES = ("affine", "symmetric")
EPS = 1e-8


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, domain: OperandDomain):
    """Scale and zero point mapping [min, max] (widened to include 0) onto the domain's codes."""
    min_val = torch.clamp(min_val, max=0.0)
    max_val = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_val - min_val) / (domain.qmax - domain.qmin), min=EPS)
    zero_point = torch.clamp(domain.qmin - torch.round(min_val / scale), domain.qmin, domain.qmax)
    return scale, zero_point


def symmetric_qparams(abs_max: torch.Tensor, domain: OperandDomain):
    """Scale for codes in [-qmax, qmax] (zero point 0); a signed domain is required."""
    if not domain.signed:
        raise ValueError("symmetric quantization needs a signed operand domain")
    scale = torch.clamp(abs_max / domain.qmax, min=EPS)
    return scale, torch.zeros_like(scale)


def zero_centred_qparams(min_val: torch.Tensor, max_val: torch.Tensor, domain: OperandDomain):
    """Scale with zero point 0 covering [min, max]: signed domains take [-m, m] (m = max |value|) on
    codes -qmax..qmax; unsigned domains take [0, max] on 0..qmax (negative values clip to 0)."""
    top = torch.maximum(min_val.abs(), max_val.abs()) if domain.signed else torch.clamp(max_val, min=0.0)
    scale = torch.clamp(top / domain.qmax, min=EPS)
    return scale, torch.zeros_like(scale)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                   qmax: int) -> torch.Tensor:
    """Integer codes (held in floats) of x; gradients pass straight through inside the range."""
    return torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (codes - zero_point) * scale


class Quantized(NamedTuple):
    """A quantizer's result: integer ``codes`` (held in floats), ``scale`` and ``zero_point`` (per tensor
    or per output channel), and ``values``, the codes dequantized (the fake-quantized tensor)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    values: torch.Tensor


class _FakeQuantize(torch.autograd.Function):
    """Codes and values of ``quantize_codes`` / ``dequantize`` for constant quantization parameters, in
    a few in-place passes; backward: their straight-through gradients (1/scale through the codes, 1
    through the values) inside the code range, 0 outside. Half the cost of the composite ops, forward
    and backward (LeNet5's five layers at batch 128: 1.6 against 2.9 ms, measured). ``track``: keep
    the in-range mask for a backward pass."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, track: bool):
        ctx.set_materialize_grads(False)
        codes = torch.div(x, scale).round_().add_(zero_point)
        if track:
            unclamped, codes = codes, codes.clamp(qmin, qmax)
            ctx.save_for_backward(codes == unclamped, scale)
        else:
            codes.clamp_(qmin, qmax)
        return codes, (codes - zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad_codes, grad_values):
        inside, scale = ctx.saved_tensors
        grad = grad_values
        if grad_codes is not None:
            grad = grad_codes / scale if grad is None else grad + grad_codes / scale
        return grad * inside, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                  qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values) of x: ``quantize_codes`` and the codes dequantized, with straight-through
    gradients; fused unless the scale or zero point is learned (PACT), where the composite ops give
    their gradients too."""
    grad_enabled = torch.is_grad_enabled()
    if grad_enabled and (scale.requires_grad or zero_point.requires_grad):
        codes = quantize_codes(x, scale, zero_point, qmin, qmax)
        return codes, dequantize(codes, scale, zero_point)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_enabled and x.requires_grad)


def zero_point_corrected(acc: torch.Tensor, sum_a: torch.Tensor | None, sum_w: torch.Tensor, k: int,
                         za: torch.Tensor, zw: torch.Tensor) -> torch.Tensor:
    """sum_k (a - za)(w - zw) from the multiplier's sum_k a*w and the operand sums, exactly.

    sum (a - za)(w - zw) = sum a*w - zw * sum a - za * sum w + k * za * zw; ``acc`` is what the
    multiplier produced for sum a*w, so approximation errors pass through unchanged. Computed in
    place in ``acc`` (an accumulator the caller owns; no full-size temporaries) and returned.
    ``sum_a`` is None when zw is known to be 0 (symmetric weights): its term drops out.
    """
    if sum_a is not None:
        acc.addcmul_(sum_a, zw, value=-1)
    return acc.sub_(za * (sum_w - k * zw))


class Observer(nn.Module):
    """Tracks the range of a tensor for affine quantization.

    ``minmax``: running extremes; ``ema``: moving average of batch min/max; ``percentile``: moving
    average of the batch's 0.01/99.99 percentiles; ``mse``: moving average of the clipping range that
    minimises the batch's quantization MSE. ``frozen`` stops updates (calibrate, then freeze).
    ``reduce_range`` (set for data-parallel training) turns a share's range into the global batch's.
    """

    def __init__(self, kind: str = "ema", momentum: float = 0.1, percentile: float = 99.99):
        super().__init__()
        if kind not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}, got {kind!r}")
        self.kind, self.momentum, self.percentile = kind, momentum, percentile
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))
        self.reduce_range: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _batch_range(self, x: torch.Tensor, domain: OperandDomain):
        if self.kind in ("minmax", "ema"):
            return torch.aminmax(x)
        flat = x.flatten()
        if flat.numel() > 1 << 20:
            flat = flat[torch.randperm(flat.numel(), device=flat.device)[: 1 << 20]]
        if self.kind == "percentile":
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=flat.device)
            low, high = torch.quantile(flat.float(), q)
            return low, high
        return _mse_range(flat, domain)

    @torch.no_grad()
    def update(self, x: torch.Tensor, domain: OperandDomain) -> None:
        if self.frozen:
            return
        low, high = self._batch_range(x.detach(), domain)
        if self.reduce_range is not None:
            low, high = self.reduce_range(low, high)
        if not self.initialized:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
            self.initialized.fill_(True)
        elif self.kind == "minmax":
            self.min_val.copy_(torch.minimum(self.min_val, low))
            self.max_val.copy_(torch.maximum(self.max_val, high))
        else:
            self.min_val.lerp_(low.to(self.min_val.dtype), self.momentum)
            self.max_val.lerp_(high.to(self.max_val.dtype), self.momentum)


def _mse_range(x: torch.Tensor, domain: OperandDomain, steps: int = 20):
    low, high = x.min(), x.max()
    best, best_err = (low, high), None
    for ratio in torch.linspace(0.3, 1.0, steps):
        lo, hi = low * ratio, high * ratio
        scale, zp = affine_qparams(lo, hi, domain)
        err = (dequantize(quantize_codes(x, scale, zp, domain.qmin, domain.qmax), scale, zp) - x).pow(2).mean()
        if best_err is None or err < best_err:
            best, best_err = (lo, hi), err
    return best


class ActivationQuantizer(nn.Module):
    """Quantizer for a layer input: ``scheme`` affine or symmetric (zero point 0), range from an observer.

    With observer ``pact`` the range is learned (PACT): the input is clipped to [0, alpha] (to
    [-alpha, alpha] when the first batch holds negative values) and alpha, a parameter initialised to
    the first batch's largest magnitude, trains with the weights (gradient through the clipping).
    """

    def __init__(self, domain: OperandDomain, observer: str = "ema", scheme: str = "affine"):
        super().__init__()
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"activation scheme must be one of {ACTIVATION_SCHEMES}, got {scheme!r}")
        self.domain, self.scheme = domain, scheme
        self.observer = Observer("minmax" if observer == "pact" else observer)
        self.alpha = nn.Parameter(torch.tensor(0.0)) if observer == "pact" else None

    def _range(self, x: torch.Tensor):
        if self.alpha is None:
            if self.training or not self.observer.initialized:
                self.observer.update(x, self.domain)
            return x, self.observer.min_val, self.observer.max_val
        if not self.observer.initialized:  # PACT: alpha starts at the first batch's range
            self.observer.update(x, self.domain)
            with torch.no_grad():
                self.alpha.copy_(torch.maximum(self.observer.min_val.abs(), self.observer.max_val))
        alpha = self.alpha.abs() + EPS
        low = -alpha if self.observer.min_val < 0 else torch.zeros_like(alpha)
        return torch.minimum(torch.maximum(x, low), alpha), low, alpha

    def forward(self, x: torch.Tensor) -> Quantized:
        """x quantized (codes, scale, zero point, values); the observer updates in training mode."""
        x, low, high = self._range(x)
        # zero point 0 on an unsigned operand would clip negative inputs (e.g. normalized images) to 0
        affine = self.scheme == "affine" or (not self.domain.signed and bool(low < 0))
        qparams = affine_qparams if affine else zero_centred_qparams
        scale, zp = qparams(low, high, self.domain)
        codes, values = fake_quantize(x, scale, zp, self.domain.qmin, self.domain.qmax)
        return Quantized(codes, scale, zp, values)

    def extra_repr(self) -> str:
        observer = "pact" if self.alpha is not None else self.observer.kind
        return f"domain={self.domain}, scheme={self.scheme}, observer={observer}"


class WeightQuantizer(nn.Module):
    """Quantizer for weights, computed from the current weights at every call.

    Symmetric when the domain is signed, affine when unsigned; per tensor or per output channel
    (dimension 0).
    """

    def __init__(self, domain: OperandDomain, per_channel: bool = False):
        super().__init__()
        self.domain, self.per_channel = domain, per_channel

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is 0 (a signed domain): exact products then need no activation sums."""
        return self.domain.signed

    def forward(self, w: torch.Tensor) -> Quantized:
        """w quantized (codes, scale, zero point, values); scale and zero point have shape [O] per
        channel or [] per tensor."""
        detached = w.detach()
        if self.per_channel:
            low, high = torch.aminmax(detached.reshape(w.shape[0], -1), dim=1)
        else:
            low, high = torch.aminmax(detached)
        if self.symmetric:
            scale, zp = symmetric_qparams(torch.maximum(low.abs(), high.abs()), self.domain)
        else:
            scale, zp = affine_qparams(low, high, self.domain)
        view = (-1,) + (1,) * (w.dim() - 1) if self.per_channel else ()
        codes, values = fake_quantize(w, scale.reshape(view), zp.reshape(view), self.domain.qmin, self.domain.qmax)
        return Quantized(codes, scale, zp, values)

    def extra_repr(self) -> str:
        return f"domain={self.domain}, per_channel={self.per_channel}"
