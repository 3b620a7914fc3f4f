"""Engines of raw tables, found by content (see :class:`EngineRegistry`).

The ops take ``engines=`` and default to :data:`DEFAULT_ENGINES`, a bounded registry documented as
the one shared object of this kind.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict

import numpy as np
import torch

from approxrun.ops.engine import LutEngine, table_values

__all__ = ["EngineRegistry", "DEFAULT_ENGINES"]


class EngineRegistry:
    """Engines of raw tables, found by content: repeated calls with the same array or tensor reuse
    one engine (its analysis, maps and plans). A tensor held by the caller is recognised by identity
    and version without reading it again; anything else costs one hash of its 256x256 values
    (about a millisecond). Holds at most ``capacity`` engines, least recently used dropped first."""

    def __init__(self, capacity: int = 32, **engine_settings):
        self.capacity = capacity
        self.engine_settings = engine_settings
        self._by_content: OrderedDict = OrderedDict()
        self._by_tensor: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._by_content)

    def engine_for(self, lut, signed_a: bool = True, signed_b: bool = True) -> LutEngine:
        """The engine of ``lut``: a LutEngine itself, a Multiplier's own, or one kept by content."""
        if isinstance(lut, LutEngine):
            return lut
        engine = getattr(lut, "engine", None)
        if isinstance(engine, LutEngine):
            return engine
        if isinstance(lut, torch.Tensor):
            hit = self._by_tensor.get(id(lut))
            if hit is not None and hit[0]() is lut and hit[1] == (lut._version, signed_a, signed_b):
                return hit[2]
        engine = self._by_values(table_values(lut), signed_a, signed_b)
        if isinstance(lut, torch.Tensor):
            key = id(lut)
            self._by_tensor[key] = (weakref.ref(lut, lambda _, key=key: self._by_tensor.pop(key, None)),
                                    (lut._version, signed_a, signed_b), engine)
        return engine

    def _by_values(self, values: np.ndarray, signed_a: bool, signed_b: bool) -> LutEngine:
        digest = hashlib.blake2b(values.tobytes(), digest_size=16).digest()
        key = (values.dtype.str, digest, signed_a, signed_b)
        if key in self._by_content:
            self._by_content.move_to_end(key)
            return self._by_content[key]
        engine = LutEngine(values, signed_a, signed_b, **self.engine_settings)
        self._by_content[key] = engine
        if len(self._by_content) > self.capacity:
            self._by_content.popitem(last=False)
        return engine


DEFAULT_ENGINES = EngineRegistry()
"""The registry the ops use for raw tables when the caller passes none (``engines=``)."""
