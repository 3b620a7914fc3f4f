"""One job across processes: per-rank shares of the global batch, and a 2-process gloo run of the
smoke experiment against a 1-process run with the same global batch (slow)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler, SequentialSampler

from approxrun.distributed import Placement, RankShares, placement_from_env
from approxrun.errors import ApproxrunError


@pytest.mark.parametrize("size, batch, world, every_rank", [(37, 8, 2, True), (37, 8, 4, False), (33, 8, 2, True),
                                                             (9, 4, 3, False), (16, 8, 2, True)])
def test_rank_shares_partition_each_global_batch_in_order(size, batch, world, every_rank):
    order = list(RandomSampler(range(size), generator=torch.Generator().manual_seed(3)))
    single = [order[i:i + batch] for i in range(0, size, batch)]
    per_rank = []
    for rank in range(world):
        sampler = RankShares(RandomSampler(range(size), generator=torch.Generator().manual_seed(3)), batch, rank,
                             world, every_rank)
        shares = list(sampler)
        assert len(shares) == len(sampler) and all(shares)
        per_rank.append(shares)
    merged = [sum((shares[step] for shares in per_rank if step < len(shares)), [])
              for step in range(max(len(s) for s in per_rank))]
    expected = [b for b in single if not every_rank or len(b) >= world]  # a last batch too small for every rank
    assert merged == expected


def test_eval_shares_cover_the_test_set_once():
    covered = sorted(i for rank in range(3) for share in RankShares(SequentialSampler(range(10)), 4, rank, 3, False)
                     for i in share)
    assert covered == list(range(10))


def test_placement_from_torchrun_environment_and_batch_check():
    placement = placement_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert placement == Placement(1, 4, 1, 2) and not placement.is_main
    assert placement_from_env({}) == Placement()
    placement.check_batch(32)
    with pytest.raises(ApproxrunError, match=r"dataset.batch_size=30: not divisible by the world size 4"):
        placement.check_batch(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, name: str, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EVOAPPROX_ROOT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"))
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={_free_port()}"] if processes > 1 else [sys.executable]
    # schedule=uniform: the training stages; the gradient stage's noise scale is taken per rank's share,
    # so under the default agn flow the two runs would differ by design, not by rounding
    command = [*launcher, "-m", "approxrun", "experiment=smoke", "schedule=uniform", "device=cpu",
               f"cache.dir={tmp_path / 'cache'}",
               f"hydra.run.dir={tmp_path / name}", *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_only_rank0_writes(tmp_path):
    """Not bit for bit: DDP averages the two shares' gradients where one process sums the whole
    batch, so float32 sums are taken in another order. After the first epoch the losses agree to
    ~1e-8 relative (the same samples, steps and weighting); then the rounding differences grow as
    training goes on, as they do between 1 and 2 threads in one process (on this smoke run the
    baseline's test accuracy moves by 1.4 points either way), so the final metrics are compared
    with that tolerance."""
    (tmp_path / "tmp").mkdir()
    one = _run(tmp_path, "one", "cache.enabled=false")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, "two", processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    parallel = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert parallel["status"] == "completed" and parallel["distributed"] == {"world_size": 2, "backend": "gloo"}
    first_epoch = (single["stages"]["baseline"]["history"][0], parallel["stages"]["baseline"]["history"][0])
    assert first_epoch[1]["train_loss"] == pytest.approx(first_epoch[0]["train_loss"], rel=1e-6)
    assert first_epoch[1]["val_loss"] == pytest.approx(first_epoch[0]["val_loss"], rel=1e-5)
    assert first_epoch[1]["val_accuracy"] == first_epoch[0]["val_accuracy"]
    for stage, expected in single["stages"].items():
        got = parallel["stages"][stage]
        assert got["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=0.03), stage
        assert got["test_loss"] == pytest.approx(expected["test_loss"], rel=0.05), stage
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=0.02), stage
        assert got["epochs"] == expected["epochs"]
    assert two.stdout.count("outputs:") == 1  # one summary table, rank 0's
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(  # stage cache entries written once
        p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".tmp"))
    assert len(list((tmp_path / "cache").iterdir())) == 3
    assert (tmp_path / "two" / "resume.pt").is_file() and (tmp_path / "two" / "checkpoints" / "approx.pt").is_file()
    assert list((tmp_path / "tmp").glob("approxrun-rank*")) == []  # rank 1's scratch folders are gone

    rerun = _run(tmp_path, "two", processes=2)  # into the same folder: every rank continues from rank 0's resume.pt
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert resumed["resumed"]["completed_stages"] == ["baseline", "quant", "approx"]
    assert resumed["stages"]["approx"]["test_accuracy"] == parallel["stages"]["approx"]["test_accuracy"]

    again = _run(tmp_path, "again", processes=2)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((tmp_path / "again" / "metrics.json").read_text())["stages"]
    assert all(stage["cached"] for stage in stages.values())
    assert stages["approx"]["test_accuracy"] == parallel["stages"]["approx"]["test_accuracy"]


@pytest.mark.slow
def test_world_size_not_dividing_the_batch_fails_with_one_line(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    result = subprocess.run(["approxrun", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines == ["approxrun: error: dataset.batch_size=32: not divisible by the world "
                                                "size 3 (the global batch is split evenly across the ranks)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_submitit_tasks_of_one_job_are_its_ranks(tmp_path):
    """What a Slurm job with tasks_per_node=2 does, on this machine: the two tasks of one submitit
    job join one process group and train one job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the launchers extra")
    env = {k: v for k, v in os.environ.items() if k not in ("EVOAPPROX_ROOT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    result = subprocess.run(["approxrun", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                             "experiment=smoke", "device=cpu", "cache.enabled=false", "stage=quant",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [metrics_file] = (tmp_path / "sweep").glob("*/metrics.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "completed" and metrics["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert set(metrics["stages"]) == {"baseline", "quant"}
