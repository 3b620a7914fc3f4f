"""Seconds per training epoch of LeNet5 in each mode (float, quant, approx) on CPU.

approx uses a random full-range LUT (no structure to exploit). Target: approx epoch <= 4x quant.
Run: python benchmarks/bench_training.py [--fashion-samples N] [--threads T]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from approxrun import approximate, set_mode, set_multiplier
from approxrun.data import build_data
from approxrun.lut import OperandDomain
from approxrun.models import build_model
from approxrun.multipliers import Multiplier
from approxrun.training import make_optimizer
import torch.nn.functional as F


def epoch_seconds(model, loader) -> float:
    optimizer = make_optimizer(model.parameters(), {"name": "sgd", "lr": 1e-3, "momentum": 0.9})
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion-samples", type=int, default=20000, help="training images of Fashion-MNIST per epoch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    lut = Multiplier("random_full_range", rng.integers(-16384, 16384, (256, 256)), OperandDomain(True),
                     OperandDomain(True))
    setups = [("digits", {"name": "digits", "image_size": 28}, 32, None),
              ("fashion_mnist", {"name": "fashion_mnist", "val_size": 5000}, 128, args.fashion_samples)]
    print(f"threads: {args.threads}")
    print(f"{'dataset':<14} {'samples':>7} {'float s':>8} {'quant s':>8} {'approx s':>9} {'approx/quant':>12}")
    for name, cfg, batch, samples in setups:
        data = build_data(cfg, "~/.cache/approxrun/data")
        train = data.train if samples is None else Subset(data.train, range(min(samples, len(data.train))))
        loader = DataLoader(train, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        model = approximate(build_model("lenet5", data.num_classes, data.in_channels, data.image_size))
        times = {}
        for mode in ("float", "quant", "approx"):
            if mode == "approx":
                set_multiplier(model, lut)
            set_mode(model, mode)
            times[mode] = epoch_seconds(model, loader)
        print(f"{name:<14} {len(train):>7} {times['float']:>8.2f} {times['quant']:>8.2f} {times['approx']:>9.2f} "
              f"{times['approx'] / times['quant']:>12.2f}")


if __name__ == "__main__":
    main()
