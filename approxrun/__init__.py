"""approxrun: train and evaluate neural networks on approximate multipliers, simulated exactly.

Notebook API (TorchApprox-like)::

    import approxrun
    model = approxrun.approximate(torchvision.models.resnet18())
    approxrun.set_mode(model, "quant")            # quantization-aware training ...
    approxrun.set_multiplier(model, approxrun.get_multiplier("drum_6"))
    approxrun.set_mode(model, "approx")           # ... then every product through the LUT

``set_multiplier`` also takes a raw 256x256 array or tensor ``lut[a][w]``; ``LutEngine`` is the
object that owns one table's derived forms and route choice (see ``approxrun.ops.engine``).
"""

from approxrun.errors import ApproxrunError
from approxrun.layers import (
    MODES,
    ApproxConv2d,
    ApproxLayer,
    ApproxLinear,
    approx_layers,
    approximate,
    count_ops,
    freeze_quantizers,
    set_mode,
    set_multiplier,
)
from approxrun.multipliers import Multiplier, builtin_multiplier, get_multiplier, load_lut, load_multiplier, save_lut
from approxrun.ops import LutEngine, lut_conv2d, lut_matmul

__version__ = "0.1.0"

__all__ = [
    "ApproxrunError", "MODES", "ApproxConv2d", "ApproxLayer", "ApproxLinear", "approx_layers", "approximate",
    "count_ops", "freeze_quantizers", "set_mode", "set_multiplier", "Multiplier", "builtin_multiplier",
    "get_multiplier", "load_lut", "load_multiplier", "save_lut", "LutEngine", "lut_conv2d", "lut_matmul",
]
