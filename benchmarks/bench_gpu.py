"""GPU throughput of the CuPy LUT kernels (approxrun.ops.cuda) and the approx/quant forward-time ratio.

Run: ``python benchmarks/bench_gpu.py [--repeats N] [--batch B]`` on a machine with a CUDA GPU and
CuPy (``pip install 'approxrun[cuda]'``).

Table 1, kernels: G lookups/s (G*M*K*N LUT reads per second, best of ``--repeats`` CUDA-event
timings, uint8 operands already in the kernels' layout) for the core shapes and the convolution
GEMMs of ResNet-20 and MobileNetV2 (CIFAR, 32x32) at the batch size; beside each figure its
on-paper bound: shared-memory bytes per clock (128 per SM) x SMs x clock, divided by the shared
bytes the kernel moves per useful lookup for that shape (slab builds and tile padding included);
for the depthwise kernel, 32 lookups per expected bank-conflict degree of random 2-byte reads.
Table 2, layers: forward time of each ApproxConv2d/ApproxLinear in mode "approx" vs "quant"
(eval, no grad), per layer and per network (layer times weighted by how often the shape occurs).
Targets on an H100-class GPU: >= 2000 G lookups/s, approx/quant <= 3x. The LUT is random over
the full 16-bit range, so no shape takes a shortcut.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter

import numpy as np
import torch

from approxrun.errors import ApproxrunError
from approxrun.layers import ApproxConv2d, ApproxLinear
from approxrun.multipliers.multiplier import Multiplier
from approxrun.ops import cuda

CORE_SHAPES = ((8192, 150, 16), (128, 256, 120), (73728, 25, 6), (4096, 576, 64), (4096, 1152, 128))
TARGET_GLOOKUPS, TARGET_RATIO = 2000.0, 3.0
SHARED_BYTES_PER_CLOCK = 128  # per SM: 32 banks x 4 bytes
SLAB_BYTES = 256 * 128  # a GEMM slab: one 128-byte bank row per activation code (kernels/lut_gemm.cu)
RESNET20 = (  # (in, out, kernel, stride, groups, input size), count; shortcuts are option A (no conv)
    ((3, 16, 3, 1, 1, 32), 1), ((16, 16, 3, 1, 1, 32), 6), ((16, 32, 3, 2, 1, 32), 1),
    ((32, 32, 3, 1, 1, 16), 5), ((32, 64, 3, 2, 1, 16), 1), ((64, 64, 3, 1, 1, 8), 5),
)
RESNET20_FC = (64, 10)
MOBILENETV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                      (6, 320, 1, 1))  # (expansion, out channels, blocks, stride), CIFAR strides
MOBILENETV2_FC = (1280, 10)


def mobilenetv2_convs() -> list[tuple[tuple[int, ...], int]]:
    """Conv shapes (in, out, kernel, stride, groups, input size) of MobileNetV2 for 32x32 inputs, with counts."""
    shapes, size, channels = [(3, 32, 3, 1, 1, 32)], 32, 32
    for expansion, out, blocks, stride in MOBILENETV2_BLOCKS:
        for i in range(blocks):
            s = stride if i == 0 else 1
            hidden = channels * expansion
            if expansion != 1:
                shapes.append((channels, hidden, 1, 1, 1, size))
            shapes.append((hidden, hidden, 3, s, hidden, size))
            size //= s
            shapes.append((hidden, out, 1, 1, 1, size))
            channels = out
    shapes.append((channels, 1280, 1, 1, 1, size))
    return list(Counter(shapes).items())


def conv_gemm(shape, batch: int) -> tuple[int, int, int, int]:
    """(groups, M, K, N) of a convolution (padding k // 2) as the kernels see it."""
    cin, cout, kernel, stride, groups, size = shape
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    return groups, batch * out * out, cin // groups * kernel * kernel, cout // groups


def best_ms(fn, repeats: int) -> float:
    """Fastest of ``repeats`` CUDA-event timings after a warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop))
    return best


def conflict_degree(entry_bytes: int, samples: int = 20000) -> float:
    """Expected shared-memory wavefronts of 32 lanes reading random entries of one 256-entry table row.

    A wavefront serves one 4-byte word per bank; lanes reading the same word share it.
    """
    words = 256 * entry_bytes // 4
    rng = np.random.default_rng(0)
    hit = np.zeros((samples, words), dtype=bool)
    hit[np.arange(samples)[:, None], rng.integers(0, 256, size=(samples, 32)) * entry_bytes // 4] = True
    return float(hit.reshape(samples, words // 32, 32).sum(1).max(1).mean())  # word w sits in bank w % 32


def bound_glookups(groups: int, m: int, k: int, n: int, wide: bool, sms: int, clock_hz: float) -> float:
    """On-paper shared-memory bound of the kernel the backend picks for this shape, in G lookups/s."""
    if n == 1 and k <= cuda.depthwise_max_k(wide):
        return sms * clock_hz * 32 / conflict_degree(4 if wide else 2) / 1e9
    plan = cuda.plan_gemm(groups, m, k, n, wide, sms)
    rows = cuda.KERNEL_DEFINES["LUT_GEMM_ROWS_PER_THREAD"]
    reads = math.ceil(m / rows) * rows * cuda.PARTS * 16  # per slab: 16 bytes per row and thread of a row group
    writes = plan.grid[0] * SLAB_BYTES
    shared = groups * plan.grid[1] * math.ceil(k / plan.k_per_slab) * (reads + writes)
    return sms * clock_hz * SHARED_BYTES_PER_CLOCK * (groups * m * k * n) / shared / 1e9


def kernel_table(shapes, image, sms, clock_hz, repeats, generator):
    print(f"{'shape':>26} {'G':>4} {'M':>7} {'K':>5} {'N':>4} | {'G lookups/s':>11} {'bound':>7} {'of bound':>8}")
    rates = []
    for label, (groups, m, k, n) in shapes:
        a_idx = torch.randint(0, 256, (groups, m, k), device="cuda", generator=generator)
        b = torch.randint(0, 256, (groups, k, n), device="cuda", generator=generator).to(torch.uint8)
        a_t = cuda.transposed_codes(a_idx)
        del a_idx
        ms = best_ms(lambda: cuda.gemm_codes(a_t, b, m, image), repeats)
        rate = groups * m * k * n / ms / 1e6
        bound = bound_glookups(groups, m, k, n, image.wide, sms, clock_hz)
        rates.append(rate)
        print(f"{label:>26} {groups:>4} {m:>7} {k:>5} {n:>4} | {rate:>11.0f} {bound:>7.0f} {rate / bound:>8.0%}")
    geo = math.exp(sum(map(math.log, rates)) / len(rates))
    print(f"{'geo-mean':>26} {'':>23} | {geo:>11.0f}   (target >= {TARGET_GLOOKUPS:.0f}; ApproxTorch ~1600 on an "
          "RTX 6000 Ada)")


def layer_times(layer, x, repeats) -> tuple[float, float]:
    """(quant ms, approx ms) of one layer's forward pass."""
    layer.train()
    layer.set_mode("quant")
    layer(x)  # calibrate the observers
    layer.eval()
    times = []
    with torch.no_grad():
        for mode in ("quant", "approx"):
            layer.set_mode(mode)
            times.append(best_ms(lambda: layer(x), repeats))
    return times[0], times[1]


def network_table(name, convs, fc, batch, multiplier, repeats):
    print(f"\n{name}, batch {batch}")
    print(f"{'layer (in,out,k,s,g,size)':>28} {'count':>5} | {'quant ms':>9} {'approx ms':>9} {'ratio':>6}")
    total_quant = total_approx = 0.0
    layers = [(shape, count, ApproxConv2d(shape[0], shape[1], shape[2], shape[3], shape[2] // 2, groups=shape[4],
                                          multiplier=multiplier), (batch, shape[0], shape[5], shape[5]))
              for shape, count in convs]
    layers.append((("fc",) + fc, 1, ApproxLinear(*fc, multiplier=multiplier), (batch, fc[0])))
    for shape, count, layer, x_shape in layers:
        quant, approx = layer_times(layer.cuda(), torch.randn(x_shape, device="cuda"), repeats)
        total_quant += count * quant
        total_approx += count * approx
        print(f"{str(shape):>28} {count:>5} | {quant:>9.3f} {approx:>9.3f} {approx / quant:>6.2f}")
        layer.cpu()
    print(f"{'network':>28} {'':>5} | {total_quant:>9.3f} {total_approx:>9.3f} {total_approx / total_quant:>6.2f}"
          f"   (target <= {TARGET_RATIO:g})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (best is kept)")
    parser.add_argument("--batch", type=int, default=128, help="batch size of the network layers")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA GPU visible to torch; run this benchmark on a machine with one")
    try:
        cuda.runner_for(torch.device("cuda"))
    except ApproxrunError as error:
        sys.exit(f"bench_gpu: {error}")
    import cupy  # importable: runner_for checked it
    device = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(device)
    clock_hz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrClockRate, device) * 1e3
    generator = torch.Generator(device="cuda").manual_seed(0)
    lut = torch.randint(-(2**15), 2**15, (256, 256), generator=generator, device="cuda").double()
    image = cuda.build_image(lut)
    print(f"{props.name}: {props.multi_processor_count} SMs at {clock_hz / 1e9:.2f} GHz, torch {torch.__version__}, "
          f"CuPy {cupy.__version__}, best of {args.repeats}")
    print(f"bound = {SHARED_BYTES_PER_CLOCK} shared bytes/clock x SMs x clock / shared bytes per lookup; "
          f"16-bit image ({'wide' if image.wide else 'narrow'} kernels)\n")

    shapes = [(f"core {m}x{k}x{n}", (1, m, k, n)) for m, k, n in CORE_SHAPES]
    for net, convs in (("resnet20", RESNET20), ("mobilenetv2", mobilenetv2_convs())):
        seen = set()
        for shape, _ in convs:
            gemm = conv_gemm(shape, args.batch)
            if gemm not in seen:
                seen.add(gemm)
                shapes.append((f"{net} {shape[0]}->{shape[1]} k{shape[2]}s{shape[3]}", gemm))
    kernel_table(shapes, image, props.multi_processor_count, clock_hz, args.repeats, generator)

    multiplier = Multiplier("random16", lut.cpu().numpy().astype(np.int64), description="random full-range LUT")
    network_table("ResNet-20", RESNET20, RESNET20_FC, args.batch, multiplier, args.repeats)
    network_table("MobileNetV2 (CIFAR)", mobilenetv2_convs(), MOBILENETV2_FC, args.batch, multiplier, args.repeats)


if __name__ == "__main__":
    main()
