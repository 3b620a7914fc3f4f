"""One job across processes: data-parallel training with torch's DistributedDataParallel.

Start the ranks with ``torchrun --nproc_per_node=N -m approxrun ...`` or as the tasks of one
submitit job (``hydra.launcher.tasks_per_node``). gloo on CPU, nccl on GPU (``cuda:LOCAL_RANK``).
Every rank builds the same model and LUT simulation from the same seed; each global batch of the
single-process loader order is split into contiguous per-rank shares, the loss of a share is
weighted so that the averaged gradient is the global batch's mean, activation observers see the
global batch's range, and metrics are summed over all ranks. Rank 0 alone writes the run folder,
the stage cache and ``resume.pt``; the others compute in a scratch folder that is removed.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

from approxrun.errors import ApproxrunError, ConfigError, one_line


@dataclass(frozen=True)
class Placement:
    """Where this process stands in its job, read from the launcher's environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    init_method: str = "env://"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly across the ranks."""
        if self.world_size > 1 and batch_size % self.world_size:
            raise ConfigError(f"dataset.batch_size={batch_size}: not divisible by the world size "
                                 f"{self.world_size} (the global batch is split evenly across the ranks)")


def placement_from_env(env: Mapping[str, str] = os.environ) -> Placement:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else a submitit job's tasks, else one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Placement(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", world)))
    if env.get("SUBMITIT_EXECUTOR"):
        from submitit.helpers import TorchDistributedEnvironment

        job = TorchDistributedEnvironment()
        if job.world_size > 1:
            return Placement(job.rank, job.world_size, job.local_rank, job.local_world_size,
                             f"tcp://{job.master_addr}:{job.master_port}")
    return Placement()


class Distributed:
    """The collectives a run needs; with one process every method is the identity."""

    def __init__(self, placement: Placement, device: torch.device):
        self.placement, self.device = placement, device
        self._wrapped: dict[int, nn.Module] = {}  # one DDP wrapper per model for the whole run

    @property
    def active(self) -> bool:
        return self.placement.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.placement.is_main

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (pickled)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def global_range(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest low and largest high over all ranks: a batch's range from its shares."""
        pair = torch.stack([-low.detach().float(), high.detach().float()])
        torch_dist.all_reduce(pair, op=torch_dist.ReduceOp.MAX)
        return (-pair[0]).to(low.dtype), pair[1].to(high.dtype)

    def sync_observers(self, model: nn.Module) -> None:
        """Make every activation observer see the range of the global batch, not its rank's share."""
        if not self.active:
            return
        for module in model.modules():
            if hasattr(module, "reduce_range"):
                module.reduce_range = self.global_range

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for training steps: DistributedDataParallel over all ranks (built once per model,
        so that no second reducer's hooks fire in a later stage), or the model itself."""
        if not self.active:
            return model
        if id(model) not in self._wrapped:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # unused: the noise scales outside the gradient stage
            self._wrapped[id(model)] = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        return self._wrapped[id(model)]

    def shard(self, loaders: tuple[DataLoader, ...], batch_size: int) -> tuple[DataLoader, ...]:
        """(train, val, test) loaders yielding this rank's share of every global batch."""
        if not self.active:
            return loaders
        self.placement.check_batch(batch_size)
        train, *others = loaders
        rank, world = self.placement.rank, self.world_size
        sharded = [DataLoader(train.dataset, num_workers=train.num_workers, generator=train.generator,
                              batch_sampler=RankShares(RandomSampler(train.dataset, generator=train.generator)
                                                       if len(train.dataset) else SequentialSampler(train.dataset),
                                                       batch_size, rank, world, every_rank=True))]
        for loader in others:
            sharded.append(DataLoader(loader.dataset, num_workers=loader.num_workers,
                                      batch_sampler=RankShares(SequentialSampler(loader.dataset), loader.batch_size,
                                                               rank, world, every_rank=False)))
        return tuple(sharded)

    def _comm_device(self) -> torch.device:
        return self.device if torch_dist.get_backend() == "nccl" else torch.device("cpu")


class RankShares(Sampler[list[int]]):
    """This rank's contiguous share of each global batch of ``sampler``'s order.

    With ``every_rank`` (training: each rank must take part in every step) a last global batch
    with fewer samples than ranks is left out on all ranks.
    """

    def __init__(self, sampler: Sampler, batch_size: int, rank: int, world: int, every_rank: bool):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world
        self.every_rank = every_rank

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield from self._share(batch)
                batch = []
        if batch:
            yield from self._share(batch)

    def _share(self, batch: list[int]) -> list[list[int]]:
        n = len(batch)
        if self.every_rank and n < self.world:
            return []
        share = batch[self.rank * n // self.world:(self.rank + 1) * n // self.world]
        return [share] if share else []

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        return sum(1 for n in sizes if (n >= self.world or not self.every_rank)
                   and (self.rank + 1) * n // self.world > self.rank * n // self.world)


@contextmanager
def process_group(placement: Placement, device: torch.device) -> Iterator[Distributed]:
    """The job's process group (gloo on CPU, nccl on GPU) for the block; one process needs none."""
    if placement.world_size <= 1:
        yield Distributed(placement, device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", placement.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        torch_dist.init_process_group(backend, init_method=placement.init_method, rank=placement.rank,
                                      world_size=placement.world_size, timeout=datetime.timedelta(minutes=30))
    except Exception as exc:
        raise ApproxrunError(f"distributed: rank {placement.rank} of {placement.world_size} could not join the "
                             f"{backend} process group ({one_line(exc)})") from None
    try:
        yield Distributed(placement, device)
    finally:
        torch_dist.destroy_process_group()
