"""approxrun: train and evaluate neural networks on approximate multipliers, simulated exactly.

Notebook API (TorchApprox-like)::

    import approxrun
    model = approxrun.approximate(torchvision.models.resnet18())
    approxrun.set_mode(model, "quant")            # quantization-aware training ...
    approxrun.set_multiplier(model, approxrun.get_multiplier("drum_6"))
    approxrun.set_mode(model, "approx")           # ... then every product through the LUT

``set_multiplier`` also takes a raw 256x256 array or tensor ``lut[a][w]``; ``LutEngine`` is the
object that owns one table's derived forms and route choice (see ``approxrun.ops.engine``).

The names below are imported on first use, so that the command line starts without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ApproxrunError": "approxrun.errors",
    **dict.fromkeys(["MODES", "ApproxConv2d", "ApproxLayer", "ApproxLinear", "approx_layers", "approximate",
                     "count_ops", "freeze_quantizers", "set_mode", "set_multiplier"], "approxrun.layers"),
    **dict.fromkeys(["Multiplier", "builtin_multiplier", "get_multiplier", "load_lut", "load_multiplier",
                     "save_lut"], "approxrun.multipliers"),
    **dict.fromkeys(["LutEngine", "lut_conv2d", "lut_matmul"], "approxrun.ops"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'approxrun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
