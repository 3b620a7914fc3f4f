"""``run(cfg, out_dir)``: one experiment, from a composed config to a complete output folder.

Phases: validate the config and build everything that can fail on bad input (multiplier, data,
model, checkpoint) before any training; run the schedule's stages in order up to ``cfg.stage``,
reusing stage results from the stage cache; write metrics, layer table, checkpoints and plots.
At every stage and epoch end the run folder's ``resume.pt`` is rewritten; with ``resume: true`` a
rerun into the same folder continues from it (completed stages are not rerun).
Nothing here imports Hydra: call ``run`` from a notebook with an OmegaConf or plain mapping.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import shutil
import time
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import approxrun
from approxrun.data import build_data
from approxrun.energy import opcount_shares, reference_power, relative_cost, relative_energy
from approxrun.errors import ApproxrunError
from approxrun.layers import approx_layers, approximate, count_ops
from approxrun.models import build_model
from approxrun.multipliers import resolve_multiplier, run_multiplier_spec
from approxrun.multipliers.catalogue import catalogue_entries
from approxrun.multipliers.multiplier import Multiplier
from approxrun.quant import ACTIVATION_SCHEMES, OBSERVERS
from approxrun.stages import StageContext, StageResult, stage_kind
from approxrun.training import epoch_checkpoints, rng_state, set_rng_state
from approxrun.utils.files import atomic_torch_save, atomic_write_json, atomic_write_text
from approxrun.utils.plots import plot_training_curves

log = logging.getLogger("approxrun")

RESUME_FILE = "resume.pt"


def to_container(cfg) -> dict:
    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except Exception as exc:  # omegaconf's MissingMandatoryValue / InterpolationResolutionError
            raise ApproxrunError(f"config: {str(exc).splitlines()[0]}") from None
    return json.loads(json.dumps(cfg))


def _deep_merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
            else value
    return out


def stage_configs(cfg: dict) -> list[dict]:
    """The stages to run, in order, each the model family's training defaults merged with the schedule."""
    schedule = cfg["schedule"]
    order, stages = list(schedule.get("order") or []), schedule.get("stages") or {}
    if not order:
        raise ApproxrunError(f"schedule {schedule.get('name')}: 'order' lists no stages")
    target = cfg.get("stage")
    if target is not None and target not in order:
        raise ApproxrunError(f"stage={target}: not a stage of schedule {schedule.get('name')!r} "
                             f"(stages: {', '.join(order)})")
    result = []
    for name in order[: order.index(target) + 1] if target else order:
        if name not in stages:
            raise ApproxrunError(f"schedule {schedule.get('name')}: stage {name!r} is in 'order' but not in 'stages'")
        entry = dict(stages[name] or {})
        kind = entry.get("kind", name)
        spec = stage_kind(kind)
        merged = _deep_merge((cfg["model"].get("train") or {}).get(kind, {}), entry) if spec.trains else entry
        merged.update(name=name, kind=kind)
        unknown = sorted(set(merged) - {"kind", "name", *spec.accepted})
        if unknown:
            raise ApproxrunError(f"schedule.stages.{name}.{unknown[0]}: not a setting of a {kind} stage "
                                 f"(expected: {', '.join(spec.accepted) or 'none'})")
        if spec.trains:
            _check_training(merged)
        result.append(merged)
    return result


def _check_training(stage: dict) -> None:
    where = f"stage {stage['name']}"
    epochs = stage.get("epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ApproxrunError(f"{where}: epochs={epochs!r}, expected a whole number >= 0 "
                             f"(model.train.{stage['kind']}.epochs or schedule.stages.{stage['name']}.epochs)")
    opt = stage.get("optimizer") or {}
    if not isinstance(opt.get("lr"), (int, float)) or opt["lr"] <= 0:
        raise ApproxrunError(f"{where}: optimizer.lr={opt.get('lr')!r}, expected a number > 0")


def _check_quant(quant: dict) -> None:
    for key in ("bits_a", "bits_b"):
        bits = quant.get(key)
        if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 8):
            raise ApproxrunError(f"quant.{key}={bits!r}: expected null or a whole number from 2 to 8")
    if quant.get("activations", "affine") not in ACTIVATION_SCHEMES:
        raise ApproxrunError(f"quant.activations={quant.get('activations')!r}: expected one of "
                             f"{', '.join(ACTIVATION_SCHEMES)}")
    if quant.get("observer") not in OBSERVERS:
        raise ApproxrunError(f"quant.observer={quant.get('observer')!r}: expected one of {', '.join(OBSERVERS)}")
    if quant.get("grad") not in approxrun.ops.GRAD_MODES:
        raise ApproxrunError(f"quant.grad={quant.get('grad')!r}: expected one of {', '.join(approxrun.ops.GRAD_MODES)}")


def _lut_strategy(lut: dict):
    """The run's LUT GEMM strategy (``lut.strategy``, ``lut.lookup_cost``), restored afterwards."""
    strategy, lookup_cost = lut.get("strategy", "auto"), lut.get("lookup_cost")
    if strategy not in approxrun.ops.STRATEGIES:
        raise ApproxrunError(f"lut.strategy={strategy!r}: expected one of {', '.join(approxrun.ops.STRATEGIES)}")
    if lookup_cost is not None and (isinstance(lookup_cost, bool) or not isinstance(lookup_cost, (int, float))
                                    or not lookup_cost > 0):
        raise ApproxrunError(f"lut.lookup_cost={lookup_cost!r}: expected null or a number > 0")
    return approxrun.ops.use_strategy(strategy, lookup_cost)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ApproxrunError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ApproxrunError(f"device={name}: CUDA is not available on this machine; use device=cpu or auto")
    return device


def seed_everything(seed: int, loader_generator: torch.Generator | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if loader_generator is not None:
        loader_generator.manual_seed(seed)


def seed_stage(key: str, loader_generator: torch.Generator | None) -> None:
    """Seed every random state from a stage's key (a hash of everything upstream, the run seed
    included): the stage draws the same numbers whether the stages before it ran or came from the
    stage cache."""
    seed_everything(int(key[:15], 16), loader_generator)


class MultiplierResolver:
    """Multiplier names -> Multiplier objects (catalogue entries bring their published costs); cached."""

    def __init__(self, evoapprox_root: str | None):
        self.evoapprox_root = evoapprox_root
        self._cache: dict[str, Multiplier] = {}
        self._by_name: dict[str, Multiplier] = {}

    def from_spec(self, spec: Mapping) -> Multiplier:
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._cache:
            multiplier = resolve_multiplier(spec, evoapprox_root=self.evoapprox_root)
            self._cache[key] = self._by_name.setdefault(multiplier.name, multiplier)
        return self._cache[key]

    def __call__(self, name: str) -> Multiplier:
        """The multiplier of that name: one resolved before in this run, else the catalogue's or a design."""
        if name not in self._by_name:
            self.from_spec(catalogue_entries().get(name) or {"name": name})
        return self._by_name[name]


def multiplier_fingerprint(multiplier: Multiplier) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(multiplier.lut).tobytes()).hexdigest()[:16]
    return f"{multiplier.name}:{multiplier.domain_a}x{multiplier.domain_b}:{digest}"


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageCache:
    """Completed stage results on disk, keyed by a hash of everything that influences them.

    An entry is a folder ``<stage>-<key>`` holding ``model.pt``, ``result.json`` and ``files/``;
    it is written under a temporary name and renamed into place, so it is complete or absent.
    """

    root: Path | None

    def entry(self, name: str, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{name}-{key[:20]}"

    def load(self, name: str, key: str):
        path = self.entry(name, key)
        if path is None or not (path / "result.json").is_file():
            return None
        try:
            state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
            result = json.loads((path / "result.json").read_text())
        except Exception as exc:
            log.warning("stage cache entry %s is unreadable (%s); recomputing", path, exc)
            return None
        return state, result, path / "files"

    def store(self, name: str, key: str, model_state: dict, result: dict, files: Path) -> None:
        final = self.entry(name, key)
        if final is None:
            return
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            torch.save(model_state, tmp / "model.pt")
            (tmp / "result.json").write_text(json.dumps(result, default=str))
            shutil.copytree(files, tmp / "files")
            tmp.rename(final)  # atomic; fails if another job stored the same entry first
        except OSError:
            if not (final / "result.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class RunCheckpoint:
    """The run folder's resume point, rewritten atomically at every stage end and epoch end.

    It holds the completed stages (name, stage-cache key, metrics record), the state stages pass
    on, the model and random states at the end of the last completed stage, and the ``train``
    state of the stage in progress (see :class:`approxrun.training.EpochCheckpoints`).
    """

    def __init__(self, path: Path):
        self.path = path
        self.completed: list[dict] = []
        self.state: dict = {}
        self.model: dict | None = None
        self.rng: dict | None = None

    def load(self, keys: list[tuple[str, str]]) -> dict | None:
        """Take over a saved resume point whose stages are these (name, key) pairs' first ones.

        Returns the saved stage in progress, or None; a resume point from another configuration
        (or an unreadable one) is ignored and the run starts over.
        """
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            done = [(entry["name"], entry["key"]) for entry in saved["completed"]]
            in_progress = saved["in_progress"]
        except Exception as exc:
            log.warning("resume point %s is unreadable (%s); starting over", self.path, exc)
            return None
        pending = [] if in_progress is None else [(in_progress["name"], in_progress["key"])]
        if done + pending != keys[:len(done) + len(pending)]:
            log.warning("resume point %s belongs to another configuration; starting over", self.path)
            return None
        self.completed, self.state, self.model, self.rng = \
            saved["completed"], saved["state"], saved["model"], saved["rng"]
        return in_progress

    def stage_done(self, name: str, key: str, record: dict, ctx: StageContext) -> None:
        self.completed.append({"name": name, "key": key, "record": record})
        self.state = dict(ctx.state)
        self.model = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                      for k, v in ctx.model.state_dict().items()}
        self.rng = rng_state(ctx.loaders[0].generator)
        self._write(None)

    def epoch_done(self, name: str, key: str, progress: dict) -> None:
        self._write(dict(progress, name=name, key=key))

    def _write(self, in_progress: dict | None) -> None:
        atomic_torch_save({"completed": self.completed, "state": self.state, "model": self.model,
                           "rng": self.rng, "in_progress": in_progress}, self.path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(exc, ApproxrunError) else f"{type(exc).__name__}: {message}"


def _load_checkpoint(path: str, model: torch.nn.Module) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ApproxrunError(f"checkpoint {file}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ApproxrunError(f"checkpoint {file}: not a readable weights-only torch checkpoint "
                             f"({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ApproxrunError(f"checkpoint {file}: expected a state_dict, found {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ApproxrunError(f"checkpoint {file}: does not fit the model ({str(exc).splitlines()[0]})") from None


def run(cfg, out_dir: str | Path) -> dict:
    """Run one experiment into ``out_dir``; returns the metrics written to ``metrics.json``.

    On failure ``metrics.json`` says ``status: failed`` with the one-line reason, and the error is
    raised again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(_artifact_dir.PREFIX + "*"):  # a killed run's temporary stage folders
        shutil.rmtree(leftover, ignore_errors=True)
    metrics: dict = {"status": "running", "error": None,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {}}
    try:
        with ExitStack() as scope:
            _run(cfg, out_dir, metrics, scope)
        metrics["status"] = "completed"
        return metrics
    except BaseException as exc:
        metrics.update(status="failed", error=_one_line(exc))
        if not isinstance(exc, ApproxrunError):
            log.exception("run failed")
        raise
    finally:
        metrics["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(out_dir / "metrics.json", metrics)


def _run(cfg, out_dir: Path, metrics: dict, scope: ExitStack) -> None:
    # --- configuration: everything that can be wrong in the input is checked here ---
    config = to_container(cfg)
    stages = stage_configs(config)
    _check_quant(config["quant"])
    scope.enter_context(_lut_strategy(config.get("lut") or {}))  # restored when the run ends
    device = select_device(str(config.get("device", "auto")))
    seed = int(config.get("seed", 0))
    resume = config.get("resume", True)
    if not isinstance(resume, bool):
        raise ApproxrunError(f"resume={resume!r}: expected true or false")
    resolver = MultiplierResolver((config.get("evoapprox") or {}).get("root"))
    multiplier = resolver.from_spec(run_multiplier_spec(config["multiplier"], config.get("library")))
    exact_power = reference_power(config["energy"].get("exact_power_mw"), multiplier)
    for stage in stages:  # a select stage's exact_power_mw: null means the run's reference
        if "exact_power_mw" in stage and stage["exact_power_mw"] is None:
            stage["exact_power_mw"] = exact_power
    metrics.update(device=str(device), seed=seed, multiplier=_describe(multiplier, exact_power))

    # --- data and model ---
    seed_everything(seed)
    data = build_data(config["dataset"], config["data_dir"])
    ds = config["dataset"]
    loaders = data.loaders(int(ds.get("batch_size", 128)), int(ds.get("eval_batch_size", 256)), seed,
                           int(ds.get("num_workers", 0)))
    model = build_model(config["model"]["name"], data.num_classes, data.in_channels, data.image_size)
    quant = config["quant"]
    approximate(model, skip=quant.get("skip") or [], multiplier=multiplier, bits_a=quant["bits_a"],
                bits_b=quant["bits_b"], observer=quant["observer"], per_channel=quant["per_channel"],
                grad=quant["grad"], activations=quant.get("activations", "affine"))
    model.to(device)
    if config.get("checkpoint"):
        _load_checkpoint(config["checkpoint"], model)
    opcounts = count_ops(model, data.train[0][0].unsqueeze(0).to(device))
    shares = opcount_shares(opcounts)
    atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))

    # --- stages ---
    cache = StageCache(Path(config["cache"]["dir"]) if config["cache"].get("enabled", True) else None)
    model_cfg = {k: v for k, v in config["model"].items() if k != "train"}
    key = _hash(approxrun.__version__, model_cfg, config["dataset"], seed, quant, config.get("checkpoint"))
    # the operand domains set the quantizers: every stage after an FP32 baseline depends on them
    domains = [str(multiplier.domain_a), str(multiplier.domain_b)]
    keys = []
    for stage in stages:
        key = _hash(key, stage, multiplier_fingerprint(multiplier) if stage_kind(stage["kind"]).uses_multiplier
                    else None, None if stage["kind"] == "baseline" else domains)
        keys.append((stage["name"], key))
    ctx = StageContext(model=model, data=data, loaders=loaders, device=device, multiplier=multiplier,
                       config=config, artifact_dir=out_dir, resolve_multiplier=resolver)
    checkpoint = RunCheckpoint(out_dir / RESUME_FILE)
    in_progress = checkpoint.load(keys) if resume else None
    _restore_completed(ctx, checkpoint, metrics, in_progress)
    for index in range(len(checkpoint.completed), len(stages)):
        stage, (name, key) = stages[index], keys[index]
        spec = stage_kind(stage["kind"])
        if index > 0:  # the first stage goes on from the run seed
            seed_stage(key, ctx.loaders[0].generator)
        with epoch_checkpoints(lambda progress, name=name, key=key: checkpoint.epoch_done(name, key, progress),
                               in_progress if in_progress is not None and in_progress["name"] == name else None):
            record = _run_stage(ctx, stage, spec, key, cache, out_dir)
        layer_multipliers = {layer_name: layer.multiplier for layer_name, layer in approx_layers(model)}
        if spec.uses_multiplier and record.get("multipliers"):  # stages whose products ran through the LUTs
            record["relative_energy"] = relative_energy(shares, layer_multipliers, exact_power)
            record["relative_costs"] = {m.name: relative_cost(m, exact_power) for m in layer_multipliers.values()}
            metrics["relative_energy"] = record["relative_energy"]
        metrics["stages"][name] = record
        atomic_write_json(out_dir / "metrics.json", metrics)
        checkpoint.stage_done(name, key, record, ctx)
    _write_layers(out_dir / "layers.csv", model, opcounts, shares)
    _print_summary(stages, metrics, out_dir)


def _restore_completed(ctx: StageContext, checkpoint: RunCheckpoint, metrics: dict,
                       in_progress: dict | None) -> None:
    """Bring the model, stage state, multipliers, random states and metrics to the resume point."""
    if not checkpoint.completed and in_progress is None:
        return
    if checkpoint.model is not None:
        ctx.model.load_state_dict(checkpoint.model)
    ctx.state.update(checkpoint.state)
    for entry in checkpoint.completed:
        _apply_multipliers(ctx, entry["record"])
        metrics["stages"][entry["name"]] = entry["record"]
        if "relative_energy" in entry["record"]:
            metrics["relative_energy"] = entry["record"]["relative_energy"]
    if checkpoint.rng is not None:
        set_rng_state(checkpoint.rng, ctx.loaders[0].generator)
    where = f", stage {in_progress['name']} after epoch {in_progress['epoch']}" if in_progress else ""
    metrics["resumed"] = {"completed_stages": [entry["name"] for entry in checkpoint.completed],
                          "stage": in_progress["name"] if in_progress else None,
                          "epoch": in_progress["epoch"] if in_progress else None}
    log.info("resuming from %s: %d completed stage(s)%s", checkpoint.path, len(checkpoint.completed), where)


def _apply_multipliers(ctx: StageContext, record: dict) -> None:
    """Give each layer the multiplier a stage's metrics record names for it."""
    for layer_name, multiplier_name in record.get("multipliers", {}).items():
        ctx.model.get_submodule(layer_name).set_multiplier(ctx.resolve_multiplier(multiplier_name))


def _run_stage(ctx: StageContext, stage: dict, spec, key: str, cache: StageCache, out_dir: Path) -> dict:
    name = stage["name"]
    start = time.perf_counter()
    cached = cache.load(name, key) if spec.cacheable else None
    if cached is not None:
        state, result, files = cached
        ctx.model.load_state_dict(state)
        ctx.state.update(result["state"])
        _apply_multipliers(ctx, result["metrics"])
        if files.is_dir():
            shutil.copytree(files, out_dir, dirs_exist_ok=True)
        log.info("stage %s: reused from the stage cache (%s)", name, cache.entry(name, key))
        record = dict(result["metrics"], cached=True)
    else:
        log.info("stage %s (%s): starting", name, stage["kind"])
        with _artifact_dir(out_dir) as files:
            ctx.artifact_dir = files
            result: StageResult = spec.run(ctx, stage)
            ctx.state.update(result.state)
            if spec.cacheable:
                cache.store(name, key, ctx.model.state_dict(),
                            {"metrics": result.metrics, "state": result.state}, files)
            shutil.copytree(files, out_dir, dirs_exist_ok=True)
        record = dict(result.metrics, cached=False)
    record.update(kind=stage["kind"], wall_time_s=round(time.perf_counter() - start, 3))
    (out_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_torch_save(ctx.model.state_dict(), out_dir / "checkpoints" / f"{name}.pt")
    if record.get("history"):
        plot_training_curves(record["history"], f"stage {name}", out_dir / f"curves_{name}.png")
    return record


class _artifact_dir:
    """A fresh temporary folder inside the run folder for one stage's files."""

    PREFIX = ".stage-"

    def __init__(self, out_dir: Path):
        self.path = out_dir / f"{self.PREFIX}{uuid.uuid4().hex}"

    def __enter__(self) -> Path:
        self.path.mkdir()
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def _describe(multiplier: Multiplier, exact_power: float) -> dict:
    cost = multiplier.cost
    return {"name": multiplier.name, "domain_a": str(multiplier.domain_a), "domain_b": str(multiplier.domain_b),
            "cost": None if cost is None else {"value": cost.value, "kind": cost.kind, "unit": cost.unit,
                                               "source": cost.source},
            "relative_cost": relative_cost(multiplier, exact_power), "metrics": multiplier.metrics.as_dict()}


def _write_layers(path: Path, model, opcounts: dict, shares: dict) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["name", "type", "weight_shape", "opcount", "opcount_share", "fan_in", "multiplier", "sigma"])
    for name, layer in approx_layers(model):
        writer.writerow([name, type(layer).__name__, "x".join(map(str, layer.weight.shape)), opcounts[name],
                         f"{shares.get(name, 0):.6f}", layer.fan_in, layer.multiplier.name,
                         f"{layer.sigma.item():.6f}"])
    atomic_write_text(path, buf.getvalue())


def _print_summary(stages: list[dict], metrics: dict, out_dir: Path) -> None:
    rows = [("stage", "test acc", "time s", "cached", "rel. energy")]
    for stage in stages:
        r = metrics["stages"][stage["name"]]
        energy = r.get("relative_energy")
        rows.append((stage["name"], f"{r['test_accuracy']:.4f}", f"{r['wall_time_s']:.1f}",
                     "yes" if r["cached"] else "no", "-" if energy is None else f"{energy:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    last = metrics["stages"][stages[-1]["name"]]
    if last.get("multipliers"):  # the multipliers the final stage ran with, and their relative cost
        costs = last.get("relative_costs") or {}
        lines.append(f"multipliers ({stages[-1]['name']}, relative cost): " + ", ".join(
            f"{layer} {name}" + ("" if costs.get(name) is None else f" {costs[name]:.3f}")
            for layer, name in last["multipliers"].items()))
    print("\n".join(lines) + f"\noutputs: {out_dir}", flush=True)
