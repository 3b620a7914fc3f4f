"""The LUT engine: one 256x256 table and everything derived from it, built once, passed explicitly.

A :class:`LutEngine` owns the integer table, its device copies (CPU tensors, the CUDA kernels'
image), the LUT-derived gradient tables, the exact low-rank factorizations and their packed maps,
the per-shape plans and the route choice. Its settings are its own: ``strategy`` (``"auto"``: the
fastest exact route by the machine's measured costs, ``"gather"``, ``"lowrank"``: low rank whenever
an exact plan exists), the routes it may use (``routes``: the plan kinds, ``map_conv``, and
``native``: the compiled kernels, for the gathers and, with ``float32`` or ``int16``, the compiled
low-rank plans), a ``lookup_cost`` factor on the gather's
modelled time, and the :class:`~approxrun.ops.lowrank.Calibration` (by default measured once per
machine and cached on disk, see :mod:`approxrun.ops.lowrank.calibration`). The convolution routes
built on its GEMMs and route model are in :mod:`approxrun.ops.convolution`.

A :class:`~approxrun.multipliers.Multiplier` has one (``multiplier.engine``). Raw arrays and tensors
get theirs from an :class:`~approxrun.ops.registry.EngineRegistry` keyed by content.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from functools import cached_property

import numpy as np
import torch

from approxrun.lut import LUT_SIZE, code_to_index
from approxrun.ops import native
from approxrun.ops.gather import depthwise_lut_gemm, grouped_lut_gemm
from approxrun.ops.gradients import gradient_tables, grouped_lut_gemm_backward
from approxrun.ops.im2col import Workspace
from approxrun.ops.lowrank import (PLAN_KINDS, Calibration, LowRankTable, candidate_plans, factor_lut,
                                   factor_rational_table, load_or_measure, lowrank_backward, lowrank_call,
                                   one_group)
from approxrun.ops.trials import TRIAL_MIN_SECONDS, TRIAL_SPREAD, RouteTrial

__all__ = ["STRATEGIES", "ROUTE_KINDS", "LutEngine", "table_values"]

log = logging.getLogger("approxrun.ops.lowrank")  # the route log: hydra.verbose=approxrun.ops.lowrank
STRATEGIES = ("auto", "gather", "lowrank")
ROUTE_KINDS = (*PLAN_KINDS, "map_conv", "native")  # routes an engine may be restricted to
UNFOLD_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}  # unfolded codes per batch block (CPU: 8 MB of int32)
PLAN_CACHE = 256  # per-shape plans an engine keeps
# the gather routes: torch ops; the compiled kernel's strategies (one read per product, tables of
# products, in-register byte permutes with lanes over b's columns or over a's rows)
TORCH_GATHER, NATIVE_GATHER, NATIVE_TABLES = "torch gather", "native gather", "native tables"
NATIVE_PERMUTE, NATIVE_PERMUTE_ROWS = "native permute", "native permute (lanes over rows)"


def table_values(lut) -> np.ndarray:
    """A 256x256 table (array or tensor) as a read-only numpy array: int64 where every entry is an
    integer below 2**53 in magnitude, else float64; a ValueError naming a wrong shape or dtype."""
    values = lut.detach().cpu().numpy() if isinstance(lut, torch.Tensor) else np.asarray(lut)
    if values.shape != (LUT_SIZE, LUT_SIZE):
        raise ValueError(f"lut must be 256x256, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"lut must hold real numbers, got dtype {values.dtype}")
    integral = np.isfinite(values).all() and (values == np.round(values)).all() and np.abs(values).max() < 2**53
    values = np.array(values, dtype=np.int64 if integral else np.float64)
    values.flags.writeable = False
    return values


class LutEngine:
    """Exact LUT GEMMs and convolutions of one table ``lut[a][b]`` (byte-indexed, operand A the
    activation); ``signed_a``/``signed_b`` give the operands' numeric order for LUT-derived gradients."""

    def __init__(self, lut, signed_a: bool = True, signed_b: bool = True, *, strategy: str = "auto",
                 routes: tuple[str, ...] = ROUTE_KINDS, lookup_cost: float | None = None,
                 calibration: Calibration | None = None, unfold_elements: int | None = None, trials: int = 5,
                 native: bool = True):
        self.values = table_values(lut)
        self.native = native  # whether the compiled CPU kernels may run (where they build)
        self.trials = trials  # routes timed on a shape's first calls under auto (below 2: the model alone;
        # 5: the model put the fastest of five routes at (73728, 25, 6) fifth, within 25% of the others)
        self.unfold_elements = unfold_elements  # None: per device, see unfold_block
        self.signed_a, self.signed_b = bool(signed_a), bool(signed_b)
        self._device_tables: dict = {}
        self.workspace = Workspace()  # the scratch memory of its GEMMs and convolutions
        self._plans: OrderedDict = OrderedDict()
        self._calibration = calibration
        self.configure(strategy, routes, lookup_cost)

    def configure(self, strategy: str = "auto", routes: tuple[str, ...] = ROUTE_KINDS,
                  lookup_cost: float | None = None, calibration: Calibration | None = None) -> "LutEngine":
        """Set the route choice (see the module); plans chosen before are forgotten."""
        if strategy not in STRATEGIES:
            raise ValueError(f"LUT GEMM strategy must be one of {STRATEGIES}, got {strategy!r}")
        unknown = set(routes) - set(ROUTE_KINDS)
        if unknown:
            raise ValueError(f"LUT routes must be among {ROUTE_KINDS}, got {sorted(unknown)}")
        if lookup_cost is not None and (isinstance(lookup_cost, bool) or not lookup_cost > 0):
            raise ValueError(f"lookup_cost must be a positive number, got {lookup_cost!r}")
        self.strategy, self.routes = strategy, tuple(routes)
        self.lookup_cost = 1.0 if lookup_cost is None else float(lookup_cost)
        if calibration is not None:
            self._calibration = calibration
        self._plans.clear()
        return self

    def __repr__(self) -> str:
        rank = "?" if "lowrank" not in self.__dict__ else (None if self.lowrank is None else self.lowrank.rank)
        return f"LutEngine(strategy={self.strategy!r}, routes={self.routes}, error rank={rank})"

    # ------------------------------------------------------------------ derived forms, built once

    @property
    def calibration(self) -> Calibration:
        """The machine's measured costs: injected, else loaded (or measured) on first use."""
        if self._calibration is None:
            self._calibration = load_or_measure()
        return self._calibration

    @property
    def integral(self) -> bool:
        """Whether the table holds integers (then every route's sums are exact integers)."""
        return self.values.dtype == np.int64

    @cached_property
    def max_abs(self) -> float:
        """The largest magnitude in the table (bounds the sums of the integer routes)."""
        return abs(self.values).max().item()

    @cached_property
    def lowrank(self) -> LowRankTable | None:
        """The exact low-rank form (None: rank above the limit, or a non-integer table)."""
        if self.values.dtype != np.int64 or self.max_abs >= 2**31:
            return None
        return LowRankTable.from_factors(factor_lut(self.values))

    @cached_property
    def _gradient_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return gradient_tables(self.values, self.signed_a, self.signed_b)

    @cached_property
    def gradient_lowrank(self) -> tuple[LowRankTable, LowRankTable] | None:
        """Exact low-rank forms of both LUT-derived gradient tables, or None."""
        fa, fb = (LowRankTable.from_factors(factor_rational_table(t)) for t in self._gradient_arrays)
        return None if fa is None or fb is None else (fa, fb)

    def table(self, device) -> torch.Tensor:
        """The LUT as a float64 tensor on ``device``."""
        key = ("lut", str(device))
        if key not in self._device_tables:
            self._device_tables[key] = torch.as_tensor(self.values.astype(np.float64), device=device)
        return self._device_tables[key]

    def gradient_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("gradients", str(device))
        if key not in self._device_tables:
            self._device_tables[key] = tuple(torch.as_tensor(t, device=device).contiguous()
                                             for t in self._gradient_arrays)
        return self._device_tables[key]

    def int32_table(self, transposed: bool = False) -> torch.Tensor:
        """The LUT as a contiguous int32 CPU tensor: the compiled CPU kernel's image (``transposed``:
        its columns as rows, which the kernel's tables of products are built from)."""
        key = ("int32", transposed)
        if key not in self._device_tables:
            values = self.values.T if transposed else self.values
            self._device_tables[key] = torch.as_tensor(np.ascontiguousarray(values, dtype=np.int32))
        return self._device_tables[key]

    @cached_property
    def byte_planes(self) -> native.BytePlanes | None:
        """The compiled in-register strategy's image of the table (values spanning at most 2**16), or None."""
        return native.byte_planes(self.values)

    def cuda_image(self, device):
        """The CUDA kernels' image of the table on ``device``, built once (no host round trip per call)."""
        from approxrun.ops import cuda
        key = ("image", str(device))
        if key not in self._device_tables:
            self._device_tables[key] = cuda.build_image(self.table(device))
        return self._device_tables[key]

    def kernel(self) -> native.NativeGemm | None:
        """The compiled CPU kernels, when the engine may use them and they build here."""
        return native.load() if self.native else None

    def cpu_kernel(self, device) -> native.NativeGemm | None:
        """The compiled CPU kernels for operands on ``device`` (None off the CPU: torch ops there)."""
        return self.kernel() if device.type == "cpu" else None

    # ------------------------------------------------------------------ routes

    def decided(self, key: tuple, decide):
        """``decide()`` for ``key`` (the question and the shape it is asked for), computed once and
        kept with the engine's per-shape plans (the :data:`PLAN_CACHE` most recent)."""
        if key not in self._plans:
            self._plans[key] = decide()
            if len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        return self._plans[key]

    def plan(self, groups: int, m: int, k: int, n: int, device: torch.device, byte_codes: bool = False):
        """(the low-rank plan for this GEMM shape, or None for the gather; why, in words), kept per shape."""
        key = (groups, m, k, n, str(device), byte_codes, torch.get_float32_matmul_precision())
        return self.decided(key, lambda: self._choose(groups, m, k, n, device, byte_codes))

    def _choose(self, groups, m, k, n, device, byte_codes):
        if self.strategy == "gather":
            return None, "gather (strategy)"
        table = self.lowrank
        if table is None:
            return None, "gather (no exact low-rank form: rank above the limit or a non-integer LUT)"
        cal = None if device.type != "cpu" else self.calibration
        plans = self._candidate_plans(groups, m, k, n, device, byte_codes)
        if not plans:
            return None, f"gather (no exact low-rank plan for K={k}, rank {table.rank})"
        best = min(plans, key=lambda p: p.time)
        if self.strategy == "auto" and cal is not None:
            route, gather = self.gather_route(groups, m, k, n, device)
            if best.time >= gather:
                return None, f"{route} ({best.kind} low rank {best.time * 1e3:.3g} ms > gather {gather * 1e3:.3g} ms)"
        return best, f"low rank {table.rank}, {best}"

    def _gather_routes(self, groups, m, k, n, device) -> list[tuple[str, float]]:
        """The gather routes with their modelled times (the lookup_cost factor applied)."""
        cal = self.calibration
        routes = [(TORCH_GATHER, cal.gather_time(groups, m, k, n))]
        if self._native_usable(device):
            routes += [(NATIVE_GATHER, cal.native_time(groups, m, k, n, False)),
                       (NATIVE_TABLES, cal.native_time(groups, m, k, n, True))]
            if self._permute_usable(k):
                routes += [(NATIVE_PERMUTE, cal.permute_time(groups, m, k, n, False)),
                           (NATIVE_PERMUTE_ROWS, cal.permute_time(groups, m, k, n, True))]
        return [(route, time_ * self.lookup_cost) for route, time_ in routes]

    def gather_route(self, groups, m, k, n, device) -> tuple[str, float]:
        """The gather route modelled fastest, and its time."""
        return min(self._gather_routes(groups, m, k, n, device), key=lambda route: route[1])

    def _ranked_routes(self, groups, m, k, n, device, byte_codes) -> list:
        """The routes auto times on a shape's first calls: the gather (and the next one, modelled
        within :data:`TRIAL_SPREAD` of it), the low-rank plan and the compiled plan modelled fastest
        (measured figures can be off on a loaded machine, and the models of the strategies err
        apart: at (128, 256, 120) the int8 plan was modelled at half the int16 plan's time and ran
        1.2x slower; at (73728, 25, 6) the permutes were modelled at 0.45 ms and ran 0.75, the
        tables at 0.58 and ran 0.50; so no family or strategy is ruled out by the model alone), then
        the other routes modelled within :data:`TRIAL_SPREAD` of the fastest, by modelled time,
        ``trials`` routes at most."""
        ranked = sorted(self._gather_routes(groups, m, k, n, device), key=lambda route: route[1])
        chosen = [route for route, time_ in ranked[:2] if time_ <= TRIAL_SPREAD * ranked[0][1]]
        if self.lowrank is not None and self.strategy != "gather":
            plans = sorted(((plan, plan.time) for plan in self._candidate_plans(groups, m, k, n, device, byte_codes)),
                           key=lambda route: route[1])
            chosen += [plan for plan, _ in plans[:1]]
            chosen += [plan for plan, _ in plans if plan.compiled and plan not in chosen][:1]
            ranked = sorted(ranked + plans, key=lambda route: route[1])
        fastest = ranked[0][1]
        chosen += [route for route, time_ in ranked if route not in chosen and time_ <= TRIAL_SPREAD * fastest]
        return chosen[:self.trials]

    def _native_usable(self, device) -> bool:
        cal = self.calibration
        return (device.type == "cpu" and "native" in self.routes and self.kernel() is not None
                and math.isfinite(min(cal.native_lookup, cal.native_table_entry + cal.native_row_add))
                and self.integral and self.max_abs < 2**31)

    def _candidate_plans(self, groups, m, k, n, device, byte_codes) -> list:
        """The exact low-rank plans of a shape with their modelled times (see :func:`candidate_plans`)."""
        cal = None if device.type != "cpu" else self.calibration
        return candidate_plans(self.lowrank, groups, m, k, n, device, cal, byte_codes, self.routes,
                               self._compiled_usable(device))

    def _compiled_usable(self, device) -> bool:
        """Whether the compiled kernel may run low-rank plans here (of the kinds in ``routes``, where
        the calibration has figures for them: :func:`candidate_plans` checks that per kind)."""
        return device.type == "cpu" and "native" in self.routes and self.kernel() is not None

    def _permute_usable(self, k: int) -> bool:
        return (self.kernel().permutes and math.isfinite(self.calibration.native_permute_group)
                and self.byte_planes is not None and k < native.SPAN16_MAX_K)

    def _gemm_call(self, groups, m, k, n, device, byte_codes):
        """(the call ``(a, b, out_dtype) -> out`` of one GEMM, the function its time goes to while
        timed). Under ``auto`` on a CPU the first calls of a shape time the candidate routes
        (:meth:`_ranked_routes`) in turns (a :class:`RouteTrial`), and the fastest measured one is
        kept, its call built once: every route is exact, so only the speed depends on it. Otherwise
        the model's choice."""
        if device.type != "cpu" or self.strategy == "lowrank" or self.trials < 2:
            return self._route_call(self._gemm_route_by_model(groups, m, k, n, device, byte_codes), device), None
        key = _trial_key(groups, m, k, n, byte_codes)
        trial = self._plans.get(key)
        if trial is not None and "call" in trial:  # a repeated shape: its kept route's call
            return trial["call"], None
        if trial is None:  # decided once per shape: later calls only look the route up
            if self._modelled_time(groups, m, k, n, device, byte_codes) < TRIAL_MIN_SECONDS:
                trial = {"best": self._gemm_route_by_model(groups, m, k, n, device, byte_codes)}
            else:
                trial = {"trial": RouteTrial(self._ranked_routes(groups, m, k, n, device, byte_codes))}
            self._plans[key] = trial
            if len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        if "best" not in trial:
            timing = trial["trial"]
            if not timing.done:
                return self._route_call(timing.route, device), timing.record
            best = timing.best_times()
            trial["best"] = timing.routes[min(range(len(best)), key=best.__getitem__)]
            log.debug("lut gemm: measured %s ms for %s: %s, shape G=%d M=%d K=%d N=%d",
                      ", ".join(f"{t * 1e3:.3g}" for t in best), ", ".join(map(_route_name, timing.routes)),
                      _route_name(trial["best"]), groups, m, k, n)
        trial["call"] = self._route_call(trial["best"], device)
        return trial["call"], None

    def _route_call(self, route, device):
        """The call ``(a, b, out_dtype) -> out`` of ``route`` (a low-rank plan, or a gather route's
        name) on ``device``. A compiled route takes one group's 2-D codes as they are."""
        if not isinstance(route, str):
            return lowrank_call(self.lowrank, route, self.cpu_kernel(device), device, self.workspace)
        kernel, planes = self.kernel(), self.byte_planes
        if route in (NATIVE_PERMUTE, NATIVE_PERMUTE_ROWS):
            rows = route == NATIVE_PERMUTE_ROWS
            return lambda a, b, out_dtype: kernel.permute(a, b, planes, rows, out_dtype)
        if route == NATIVE_GATHER:
            image = self.int32_table()
            return lambda a, b, out_dtype: kernel(a, b, image, a.shape[-1] * self.max_abs >= 2**31, out_dtype)
        if route == NATIVE_TABLES:
            columns, budget = self.int32_table(transposed=True), self.calibration.native_table_bytes or None
            return lambda a, b, out_dtype: kernel.tables(a, b, columns, a.shape[-1] * self.max_abs >= 2**31,
                                                         out_dtype, planes, budget)
        return lambda a, b, out_dtype: one_group(self._gather_gemm, a, b).to(out_dtype)

    @property
    def timing(self) -> bool:
        """Whether auto is still timing the candidate routes of any shape it has seen."""
        return any(_timing(entry) for entry in self._plans.values())

    def timing_routes(self, groups: int, m: int, k: int, n: int, byte_codes: bool = False) -> bool:
        """Whether auto is still timing its candidate routes for this CPU GEMM shape (its first
        calls); False once a route is kept, or where nothing is timed."""
        return _timing(self._plans.get(_trial_key(groups, m, k, n, byte_codes)))

    def _gemm_route_by_model(self, groups, m, k, n, device, byte_codes):
        plan = self.logged_plan("gemm", groups, m, k, n, device, byte_codes)
        if plan is not None:
            return plan
        if device.type != "cpu" or self.strategy == "lowrank":
            return TORCH_GATHER
        return self.gather_route(groups, m, k, n, device)[0]

    def _modelled_time(self, groups, m, k, n, device, byte_codes) -> float:
        """The model's time of the route it would pick (seconds)."""
        plan = self.plan(groups, m, k, n, device, byte_codes)[0]
        gather = self.gather_route(groups, m, k, n, device)[1]
        return gather if plan is None else min(gather, plan.time)

    def chosen_route(self, groups: int, m: int, k: int, n: int, device, byte_codes: bool = False) -> str:
        """The route a GEMM of this shape takes now, in words (after auto's timed first calls: the
        measured fastest; before them, or without trials: the model's choice)."""
        trial = self._plans.get(_trial_key(groups, m, k, n, byte_codes))
        if trial is not None and "best" in trial:
            return _route_name(trial["best"])
        return _route_name(self._gemm_route_by_model(groups, m, k, n, torch.device(device), byte_codes))

    def logged_plan(self, what: str, groups, m, k, n, device, byte_codes=False):
        """:meth:`plan`'s plan (None: the gather), its reason written to the route log."""
        plan, reason = self.plan(groups, m, k, n, device, byte_codes)
        log.debug("lut %s: %s, shape G=%d M=%d K=%d N=%d", what, reason, groups, m, k, n)
        return plan

    # ------------------------------------------------------------------ operations

    def gemm(self, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """out[g, m, n] = sum_k lut[byte(a[g, m, k])][byte(b[g, k, n])] of code tensors, as
        ``out_dtype``: float64, or int64 for an integer table (its sums are exact integers; the
        compiled routes write them directly). a [M, K] and b [K, N] give out [M, N]: one group, which
        the compiled kernels take without views (a small GEMM's per-call cost)."""
        if a.dim() == 2:
            groups, (m, k) = 1, a.shape
        else:
            groups, m, k = a.shape
        n = b.shape[-1]
        if not groups * m * k * n:
            return one_group(self._gather_gemm, a, b).to(out_dtype)
        call, record = self._gemm_call(groups, m, k, n, a.device, a.dtype in (torch.int8, torch.uint8))
        if record is None:
            return call(a, b, out_dtype)
        start = time.perf_counter()  # a call of auto's route trials
        out = call(a, b, out_dtype)
        record(time.perf_counter() - start)
        return out

    def _gather_gemm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        groups, n = a.shape[0], b.shape[2]
        if a.is_cuda:  # CuPy LUT kernels; without CuPy, a one-line install error
            from approxrun.ops import cuda
            return cuda.index_gemm(code_to_index(a), code_to_index(b), self.cuda_image(a.device))
        lut = self.table(a.device)
        if n == 1 and groups > 1:
            log.debug("lut gemm: depthwise gather path for %d groups", groups)
            return depthwise_lut_gemm(code_to_index(a), code_to_index(b)[:, :, 0], lut).unsqueeze(-1)
        return grouped_lut_gemm(a, b, lut, direct=self.calibration.gather_direct(a.shape[1], n))

    def backward(self, grad_out: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 needs: tuple[bool, bool] = (True, True)):
        """(grad_a, grad_b) float64 of the GEMM of codes a [G, M, K], b [G, K, N] through the
        LUT-derived gradient tables; None where ``needs`` says the gradient is not wanted."""
        groups, m, k = a.shape
        n = b.shape[2]
        kernel = self.cpu_kernel(a.device) if "native" in self.routes else None
        factored = None if self.strategy == "gather" or not groups * m * k * n else self.gradient_lowrank
        if factored is not None and self.strategy == "auto" and a.device.type == "cpu":
            fa, fb = factored
            cal = self.calibration
            columns = fa.width * needs[0] + fb.width * needs[1]  # grad_a takes fa's columns, grad_b fb's
            table_time = cal.table_backward_time(groups, m, k, n, needs, kernel is not None)
            if cal.lowrank_backward_time(groups, m, k, n, columns) >= table_time * self.lookup_cost:
                factored = None
        if factored is not None:
            log.debug("lut backward: low rank %d + %d", factored[0].width, factored[1].width)
            return lowrank_backward(grad_out, a, b, *factored, needs)
        da, db = self.gradient_tensors(a.device)
        if kernel is not None:
            log.debug("lut backward: compiled gradient-table reads")
            return kernel.lut_backward(grad_out, a, b, da, db, needs)
        log.debug("lut backward: gradient-table gathers")
        a_idx, b_idx = code_to_index(a), code_to_index(b)
        if a.is_cuda:
            from approxrun.ops import cuda
            grad_a, grad_b = cuda.lut_gemm_backward(grad_out, a_idx, b_idx, da, db)
            return grad_a if needs[0] else None, grad_b if needs[1] else None
        return grouped_lut_gemm_backward(grad_out, a_idx, b_idx, da, db, needs)

    def unfold_block(self, device: torch.device) -> int:
        """Unfolded code elements per batch block: the engine's setting, else bounded CPU scratch
        memory and far larger blocks on a GPU (one launch covers many samples)."""
        if self.unfold_elements is not None:
            return self.unfold_elements
        return UNFOLD_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]


def _trial_key(groups, m, k, n, byte_codes) -> tuple:
    """The key of a CPU GEMM shape's route trial in an engine's plans."""
    return ("trial", groups, m, k, n, byte_codes, torch.get_float32_matmul_precision())


def _timing(entry) -> bool:
    """Whether an entry of an engine's plans is a shape's route trial still running."""
    return isinstance(entry, dict) and "best" not in entry


def _route_name(route) -> str:
    return route if isinstance(route, str) else str(route)
