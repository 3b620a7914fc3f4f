"""``run(cfg, out_dir)``: one experiment, from a composed config to a complete output folder.

The run loop only; each job it hands out has its module: the config check
(:mod:`approxrun.config`), device/seeds/initial weights (:mod:`approxrun.runtime`), trained weights
(:mod:`approxrun.weights`), torch's threads (:mod:`approxrun.threads`), the ranks of a data-parallel
job (:mod:`approxrun.distributed`), multiplier resolution (:mod:`approxrun.multipliers.resolver`),
the stage cache (:mod:`approxrun.stage_cache`), the resume state (:mod:`approxrun.resume`), the
stages (:mod:`approxrun.stages`) and the run's report (:mod:`approxrun.run_report`).

Phases: check the config and build everything that can fail on bad input (multiplier, data, model,
initial weights) before any training; run the schedule's stages in order up to ``cfg.stage``,
reusing stage results from the stage cache and continuing from the run folder's resume state; write
metrics, layer table, stage checkpoints and plots. In a data-parallel job rank 0 alone writes the
run folder and the stage cache; the other ranks compute in a scratch folder that is removed.
Nothing here imports Hydra: call ``run`` from a notebook with an OmegaConf or plain mapping.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf

from approxrun.config import load_config, stage_configs
from approxrun.data import build_data
from approxrun.distributed import Distributed, Placement, placement_from_env, process_group
from approxrun.energy import opcount_shares, reference_power, relative_cost, relative_energy
from approxrun.errors import ApproxrunError, one_line
from approxrun.layers import approx_layers, approximate, count_ops
from approxrun.models import model_from_config
from approxrun.multipliers.resolver import MultiplierResolver, run_multiplier_spec
from approxrun.resume import RESUME_FILE, ResumeState
from approxrun.run_report import describe_multiplier, print_summary, write_layers
from approxrun.runtime import load_initial_weights, seed_everything, seed_stage, select_device
from approxrun.stage_cache import StageCache, stage_keys
from approxrun.stages import StageContext, StageKind, StageResult, stage_kind
from approxrun.threads import thread_budget, torch_threads
from approxrun.utils.files import atomic_torch_save, atomic_write_json, atomic_write_text
from approxrun.utils.plots import plot_training_curves
from approxrun.weights import WeightsFile, read_model_weights, weights_preprocessing

log = logging.getLogger("approxrun")

STAGE_CHECKPOINTS = "checkpoints"  # <run>/checkpoints/<stage>.pt: the weights after each stage


def run(cfg, out_dir: str | Path, concurrent_jobs: int = 1) -> dict:
    """Run one experiment into ``out_dir``; returns the metrics written to ``metrics.json``.

    ``concurrent_jobs``: jobs running at once on this machine (a local parallel sweep), which share
    its CPUs under ``threads: auto``. On failure ``metrics.json`` says ``status: failed`` with the
    one-line reason, and the error is raised again.
    """
    placement = placement_from_env()
    out_dir = Path(out_dir) if placement.is_main else Path(tempfile.mkdtemp(prefix=f"approxrun-rank{placement.rank}-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(_artifact_dir.PREFIX + "*"):  # a killed run's temporary stage folders
        shutil.rmtree(leftover, ignore_errors=True)
    metrics: dict = {"status": "running", "error": None,
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": {}}
    try:
        with ExitStack() as scope:
            if not placement.is_main:  # the other ranks write nothing that outlives the run
                scope.callback(shutil.rmtree, out_dir, ignore_errors=True)
            _run(cfg, out_dir, metrics, scope, max(concurrent_jobs, placement.local_world_size), placement)
        metrics["status"] = "completed"
        return metrics
    except BaseException as exc:
        metrics.update(status="failed", error=one_line(exc))
        if not isinstance(exc, ApproxrunError):
            log.exception("run failed")
        raise
    finally:
        metrics["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if placement.is_main:
            atomic_write_json(out_dir / "metrics.json", metrics)


def _run(cfg, out_dir: Path, metrics: dict, scope: ExitStack, concurrent_jobs: int, placement: Placement) -> None:
    # --- configuration: everything that can be wrong in the input is checked here ---
    config = load_config(cfg)
    stages = stage_configs(config)
    weights = config["model"]["weights"]
    weights_file = read_model_weights(weights)
    if weights:  # the weights are the baseline: not trained, only tested
        stages = [dict(stage, epochs=0) if stage["kind"] == "baseline" else stage for stage in stages]
    device = select_device(config["device"])
    placement.check_batch(config["dataset"]["batch_size"])
    seed = config["seed"]
    resolver = MultiplierResolver(config["evoapprox"]["root"], config["lut"])  # engines take lut.strategy
    multiplier = resolver.from_spec(run_multiplier_spec(config["multiplier"], config.get("library")))
    exact_power = reference_power(config["energy"]["exact_power_mw"], multiplier)
    for stage in stages:  # a select stage's exact_power_mw: null means the run's reference
        if "exact_power_mw" in stage and stage["exact_power_mw"] is None:
            stage["exact_power_mw"] = exact_power
    threads = scope.enter_context(torch_threads(thread_budget(config["threads"], concurrent_jobs)))
    log.info("torch threads: %d (%s)", threads.count, threads.source)
    metrics.update(device=str(device), seed=seed, threads=threads.as_dict(),
                   multiplier=describe_multiplier(multiplier, exact_power))

    # --- data and model ---
    dist = scope.enter_context(process_group(placement, device))
    device = dist.device
    if dist.active:
        metrics["distributed"] = {"world_size": dist.world_size, "backend": "nccl" if device.type == "cuda" else "gloo"}
    seed_everything(seed)
    data = build_data(config["dataset"], config["data_dir"], weights_preprocessing(config["model"], config["dataset"]))
    ds = config["dataset"]
    loaders = data.loaders(ds["batch_size"], ds["eval_batch_size"], seed, ds["num_workers"])
    loaders = dist.shard(loaders, ds["batch_size"])
    model = _build_model(config, data, multiplier, weights_file, dist)
    opcounts = count_ops(model, data.example().unsqueeze(0).to(device))
    shares = opcount_shares(opcounts)
    atomic_write_text(out_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))

    # --- stages ---
    cache = StageCache(Path(config["cache"]["dir"]) if config["cache"]["enabled"] and dist.is_main else None)
    keys = stage_keys(config, stages, multiplier, lambda kind: stage_kind(kind).uses_multiplier,
                      weights_file.fingerprint if weights_file is not None else None)
    ctx = StageContext(model=model, data=data, loaders=loaders, device=device, multiplier=multiplier,
                       config=config, artifact_dir=out_dir, resolve_multiplier=resolver, dist=dist)
    resume = ResumeState(out_dir / RESUME_FILE)
    if resume.share(dist, config["resume"] and resume.load(keys)):  # every rank goes on from rank 0's state
        _restore(ctx, resume, metrics)
    for index in range(len(resume.completed), len(stages)):
        stage, (name, key) = stages[index], keys[index]
        spec = stage_kind(stage["kind"])
        if index > 0:  # the first stage goes on from the run seed
            seed_stage(key, ctx.loaders[0].generator)
        ctx.progress = resume.training_progress(name, key)
        record = _run_stage(ctx, stage, spec, key, cache, out_dir)
        ctx.progress = None
        if weights and stage["kind"] == "baseline":
            record["skipped"] = f"model.weights={weights}"
        if spec.uses_multiplier and record.get("multipliers"):  # stages whose products ran through the LUTs
            layer_multipliers = {layer_name: layer.multiplier for layer_name, layer in approx_layers(model)}
            record["relative_energy"] = relative_energy(shares, layer_multipliers, exact_power)
            record["relative_costs"] = {m.name: relative_cost(m, exact_power) for m in layer_multipliers.values()}
            metrics["relative_energy"] = record["relative_energy"]
        metrics["stages"][name] = record
        atomic_write_json(out_dir / "metrics.json", metrics)
        resume.stage_done(name, key, record, ctx)
    write_layers(out_dir / "layers.csv", model, opcounts, shares)
    if dist.is_main:
        print_summary(stages, metrics, out_dir)


def _build_model(config: dict, data, multiplier, weights_file: WeightsFile | None, dist: Distributed):
    """The model converted to approximate layers on the run's device, with its starting weights:
    ``model.weights`` (a float state_dict before conversion, a stage checkpoint after it), then
    ``init_weights``."""
    model = model_from_config(config["model"], data.num_classes, data.in_channels, data.image_size)
    if weights_file is not None and not weights_file.approximate:
        weights_file.load_into(model)
    quant = config["quant"]
    approximate(model, skip=quant["skip"], multiplier=multiplier, bits_a=quant["bits_a"], bits_b=quant["bits_b"],
                observer=quant["observer"], per_channel=quant["per_channel"], grad=quant["grad"],
                activations=quant["activations"])
    model.to(dist.device)
    if weights_file is not None and weights_file.approximate:
        weights_file.load_into(model)
    dist.sync_observers(model)
    if config["init_weights"]:
        load_initial_weights(config["init_weights"], model)
    return model


def _restore(ctx: StageContext, resume: ResumeState, metrics: dict) -> None:
    """Bring the model, stage state, multipliers, random states and metrics to the resume state."""
    from approxrun.training import set_rng_state

    if resume.model is not None:
        ctx.model.load_state_dict(resume.model)
    ctx.state.update(resume.state)
    for entry in resume.completed:
        _apply_multipliers(ctx, entry["record"])
        metrics["stages"][entry["name"]] = entry["record"]
        if "relative_energy" in entry["record"]:
            metrics["relative_energy"] = entry["record"]["relative_energy"]
    if resume.rng is not None:
        set_rng_state(resume.rng, ctx.loaders[0].generator)
    in_progress = resume.in_progress
    where = f", stage {in_progress['name']} after epoch {in_progress['epoch']}" if in_progress else ""
    metrics["resumed"] = {"completed_stages": [entry["name"] for entry in resume.completed],
                          "stage": in_progress["name"] if in_progress else None,
                          "epoch": in_progress["epoch"] if in_progress else None}
    log.info("resuming from %s: %d completed stage(s)%s", resume.path, len(resume.completed), where)


def _apply_multipliers(ctx: StageContext, record: dict) -> None:
    """Give each layer the multiplier a stage's metrics record names for it."""
    for layer_name, multiplier_name in record.get("multipliers", {}).items():
        ctx.model.get_submodule(layer_name).set_multiplier(ctx.resolve_multiplier(multiplier_name))


def _run_stage(ctx: StageContext, stage: dict, spec: StageKind, key: str, cache: StageCache, out_dir: Path) -> dict:
    name = stage["name"]
    start = time.perf_counter()
    cached = ctx.dist.broadcast(cache.load(name, key) if spec.cacheable else None)  # rank 0's entry
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
    (out_dir / STAGE_CHECKPOINTS).mkdir(exist_ok=True)
    atomic_torch_save(ctx.model.state_dict(), out_dir / STAGE_CHECKPOINTS / f"{name}.pt")
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
