"""Seconds per training epoch of LeNet5 in each mode (float, quant, approx) on CPU.

approx runs twice: with a random full-range LUT (no structure to exploit: the gather routes; target
<= 2.5x the quant epoch) and with a rank-2 multiplier (DRUM-4: exact low-rank plans; target <= 1.5x).
Each mode trains untimed epochs first, until the engine has timed its candidate routes on each
shape's first calls (a training run amortises that over its epochs; at most WARM_EPOCHS). Then
``--epochs`` rounds in which the modes take turns, one timed epoch each; each mode's fastest epoch
counts. Taking turns makes a slow spell of the machine hit every mode alike (a digits epoch takes
0.2 s: run after run, the quant epoch alone varied from 0.15 to 0.21 s on a 2-core machine).
Run: python benchmarks/bench_training.py [--fashion-samples N] [--threads T] [--low-rank NAME] [--epochs N]
[--grad ste|lut] (``lut``: LUT-derived gradients in approx mode, ``quant.grad=lut``; no target)
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from approxrun import approximate, set_mode, set_multiplier
from approxrun.config.schema import OptimizerConfig
from approxrun.data import build_data
from approxrun.lut import OperandDomain
from approxrun.models import build_model
from approxrun.multipliers import Multiplier, get_multiplier
from approxrun.ops import LutEngine
from approxrun.ops.lowrank.calibration import cpu_description, machine_key
from approxrun.training import make_optimizer
import torch.nn.functional as F


MODES = ("float", "quant", "approx", "approx-lr")
WARM_EPOCHS = 10  # untimed epochs at most before the timed ones: until the engine's route trials are over
# (a digits epoch calls each shape 56 times; a trial of three routes took 5-6 epochs there)


def epoch_seconds(model, loader) -> float:
    optimizer = make_optimizer(model.parameters(), asdict(OptimizerConfig(name="sgd", lr=1e-3, momentum=0.9)))
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def use_mode(model, mode: str, lut: Multiplier, low_rank: Multiplier) -> LutEngine:
    """Put ``model`` in ``mode`` (approx-lr: approx with the low-rank multiplier); the engine of its
    multiplier."""
    multiplier = lut if mode == "approx" else low_rank
    if mode.startswith("approx"):
        set_multiplier(model, multiplier)
    set_mode(model, mode.removesuffix("-lr"))
    return multiplier.engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-samples", type=int, default=20000, help="training images of Fashion-MNIST per epoch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--low-rank", default="drum_4", help="the low-rank multiplier of the second approx run")
    parser.add_argument("--epochs", type=int, default=3,
                        help="rounds of timed epochs, one per mode each (each mode's fastest counts)")
    parser.add_argument("--grad", default="ste", choices=("ste", "lut"),
                        help="approx mode's gradients: straight-through, or LUT-derived (quant.grad=lut)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    lut = Multiplier("random_full_range", rng.integers(-16384, 16384, (256, 256)), OperandDomain(True),
                     OperandDomain(True))
    setups = [("digits", {"name": "digits", "image_size": 28}, 32, None),
              ("fashion_mnist", {"name": "fashion_mnist", "val_size": 5000}, 128, args.fashion_samples)]
    low_rank = get_multiplier(args.low_rank)
    table = low_rank.engine.lowrank
    cpu = cpu_description()
    isa = " ".join(f"{name}={value}" for name, value in machine_key()["isa_env"].items())
    print(f"CPU: {cpu['model']}; flags: {' '.join(cpu['flags']) or '-'}; ISA env: {isa or 'none'}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(not set: glibc defaults)')}")
    print(f"threads: {args.threads}; approx: random full-range LUT; approx-lr: {low_rank.name} "
          f"(error rank {'above the limit' if table is None else table.rank}); approx gradients: {args.grad}")
    print(f"{'dataset':<14} {'samples':>7} {'float s':>8} {'quant s':>8} {'approx s':>9} {'approx/quant':>12} "
          f"{'approx-lr s':>11} {'approx-lr/quant':>15}")
    for name, cfg, batch, samples in setups:
        data = build_data(cfg, "~/.cache/approxrun/data")
        train = data.train if samples is None else Subset(data.train, range(min(samples, len(data.train))))
        loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = approximate(build_model("lenet5", data.num_classes, data.in_channels, data.image_size),
                            grad=args.grad)
        for mode in MODES:
            engine = use_mode(model, mode, lut, low_rank)
            for _ in range(WARM_EPOCHS):  # warm-up: allocator, thread pool, the engine's route trials
                epoch_seconds(model, loader)
                if not (mode.startswith("approx") and engine.timing):
                    break
        times = dict.fromkeys(MODES, math.inf)
        for _ in range(args.epochs):
            for mode in MODES:
                use_mode(model, mode, lut, low_rank)
                times[mode] = min(times[mode], epoch_seconds(model, loader))
        print(f"{name:<14} {len(train):>7} {times['float']:>8.2f} {times['quant']:>8.2f} {times['approx']:>9.2f} "
              f"{times['approx'] / times['quant']:>12.2f} {times['approx-lr']:>11.2f} "
              f"{times['approx-lr'] / times['quant']:>15.2f}")


if __name__ == "__main__":
    main()
