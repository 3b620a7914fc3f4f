"""The CUDA backend (approxrun/ops/cuda.py, kernels/*.cu), verified without a GPU.

1. Every kernel source compiles with NVRTC for compute_75, compute_80 and compute_90.
2. The kernels run on the CPU under the SIMT emulator (tests/emulation: one std::thread per CUDA
   thread, std::barrier for __syncthreads and warp shuffles), launched by the backend's own
   planning code, and match a numpy gather oracle bit for bit.
3. On a GPU (``-m cuda``), the CuPy path matches the CPU path on real layers.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import conv2d_oracle, matmul_oracle, random_lut

from approxrun.errors import ApproxrunError
from approxrun.lut import exact_lut
from approxrun.ops import EngineRegistry, cuda, engine_for
from approxrun.ops.gradients import gradient_tables, grouped_lut_gemm_backward

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "emulation"
SOURCES = sorted({*cuda.KERNEL_FILES.values()})


# ---------------------------------------------------------------------------------------------
# the emulator


@pytest.fixture(scope="session")
def driver(tmp_path_factory) -> Path:
    """The emulation driver, compiled once per test session; misaligned vector loads abort it
    (``-fsanitize=alignment``: plain x86 loads never fault, a GPU's do)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is needed for the SIMT emulation")
    binary = tmp_path_factory.mktemp("simt") / "driver"
    defines = [option for option in cuda.compile_options() if option.startswith("-D")]
    subprocess.run([compiler, "-std=c++20", "-O2", "-pthread", "-fno-strict-aliasing", "-Wall",
                    "-fsanitize=alignment", "-fno-sanitize-recover=alignment",
                    "-Wno-unknown-pragmas", f"-I{ROOT / 'kernels'}", f"-I{EMULATION}", *defines,
                    str(EMULATION / "driver.cpp"), "-o", str(binary)], check=True)
    return binary


class EmulatedRunner:
    """Runs the backend's launches through the driver; tensors travel as files and come back in place."""

    def __init__(self, driver: Path, workdir: Path, sm_count: int):
        self.driver, self.workdir, self.sm_count = driver, workdir, sm_count
        self.kernels: list[str] = []

    def __call__(self, launch: cuda.Launch) -> None:
        lines = [f"kernel {launch.kernel}", "grid {} {} {}".format(*launch.grid), "block {} {} {}".format(*launch.block)]
        buffers = []
        for i, arg in enumerate(launch.args):
            if isinstance(arg, torch.Tensor):
                assert arg.is_contiguous() and arg.device.type == "cpu"
                path = self.workdir / f"arg{i}.bin"
                arg.numpy().tofile(path)
                lines.append(f"buf {path} {arg.numel() * arg.element_size()}")
                buffers.append((arg, path))
            else:
                kind = {np.int32: "i32", np.int64: "i64", np.float64: "f64"}[type(arg)]
                lines.append(f"{kind} {arg}")
        spec = self.workdir / "launch.txt"
        spec.write_text("\n".join(lines) + "\n")
        result = subprocess.run([str(self.driver), str(spec)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for tensor, path in buffers:
            tensor.copy_(torch.from_numpy(np.fromfile(path, dtype=tensor.numpy().dtype).reshape(tensor.shape)))
        self.kernels.append(launch.kernel)


@pytest.fixture
def emulator(driver, tmp_path):
    def make(sm_count: int = 1) -> EmulatedRunner:
        return EmulatedRunner(driver, tmp_path, sm_count)

    return make


# ---------------------------------------------------------------------------------------------
# LUTs and operands


def lut_spanning(rng, low: int, high: int) -> np.ndarray:
    """Asymmetric random LUT whose entries span exactly [low, high]."""
    lut = random_lut(rng, low, high)
    lut[3, 250], lut[250, 3] = low, high
    return lut


def gemm_oracle(lut, a_idx, b_idx) -> np.ndarray:
    return np.stack([matmul_oracle(a, b, lut) for a, b in zip(a_idx, b_idx)])


NARROW_SIGNED = dict(low=-20000, high=13000)  # fits 16 bits after the bias
NARROW_FULL = dict(low=-40000, high=25535)  # range exactly 65535: the widest 16-bit image
WIDE = dict(low=-3_000_000, high=70_000)  # range > 65535: 32-bit image
WIDE_BIASED = dict(low=0, high=3_000_000_000)  # beyond int32: 32-bit image with a bias


def operands(rng, groups, m, k, n):
    return rng.integers(0, 256, size=(groups, m, k)), rng.integers(0, 256, size=(groups, k, n))


def emulated_gemm(runner, lut, a_idx, b_idx):
    return cuda.index_gemm(torch.from_numpy(a_idx), torch.from_numpy(b_idx),
                           cuda.build_image(torch.from_numpy(lut).double()), runner=runner).numpy()


# ---------------------------------------------------------------------------------------------
# 1. NVRTC


@pytest.mark.parametrize("arch", [75, 80, 90])
@pytest.mark.parametrize("filename", SOURCES)
def test_sources_compile_with_nvrtc(filename, arch):
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    program = nvrtc.createProgram(cuda.kernel_source(filename), filename, [], [])
    try:
        nvrtc.compileProgram(program, [f"--gpu-architecture=compute_{arch}", *cuda.compile_options()])
        log = nvrtc.getProgramLog(program)
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    assert "warning" not in log, log
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for kernel in (name for name, source in cuda.KERNEL_FILES.items() if source == filename):
        assert f".entry {kernel}(" in ptx


def test_gemm_kernel_keeps_its_sums_in_registers():
    """ptxas for sm_90: the 16 rows x 8 columns of sums per thread neither spill nor use a stack."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    program = nvrtc.createProgram(cuda.kernel_source("lut_gemm.cu"), "lut_gemm.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["--gpu-architecture=sm_90", "-Xptxas=-v", *cuda.compile_options()])
        log = nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)
    frames = [line for line in log.splitlines() if "stack frame" in line]
    assert len(frames) == 2 and all("0 bytes stack frame, 0 bytes spill stores" in line for line in frames), log


# ---------------------------------------------------------------------------------------------
# 2. emulated kernels vs the oracle


@pytest.mark.parametrize("shape, lut_range, sm_count", [
    ((1, 23, 115, 23), NARROW_SIGNED, 1),  # n-tile 32 (2 k per slab), one block
    ((1, 23, 115, 23), NARROW_SIGNED, 12),  # the same, split-K
    ((2, 115, 23, 70), NARROW_FULL, 1),  # n-tile 64 (1 k per slab), two n-tiles, two groups
    ((1, 530, 9, 6), NARROW_SIGNED, 4),  # two row blocks, n-tile 8 (8 k per slab), partial slab, split
    ((1, 115, 37, 9), NARROW_FULL, 1),  # n-tile 16 (4 k per slab)
    ((1, 1, 1, 2), NARROW_SIGNED, 1),  # single product
    ((1, 23, 115, 23), WIDE, 1),  # 32-bit image: n-tile 32 (1 k per slab)
    ((3, 37, 19, 5), WIDE, 8),  # 32-bit image: n-tile 8 (4 k per slab), split-K
    ((2, 23, 23, 3), WIDE, 1),  # 32-bit image: n-tile 4 (8 k per slab)
    ((1, 23, 37, 9), WIDE_BIASED, 1),  # 32-bit image whose entries need the bias
])
def test_gemm_matches_oracle(emulator, shape, lut_range, sm_count):
    rng = np.random.default_rng(sum(shape) + sm_count)
    lut = lut_spanning(rng, **lut_range)
    a_idx, b_idx = operands(rng, *shape)
    runner = emulator(sm_count)
    out = emulated_gemm(runner, lut, a_idx, b_idx)
    wide = lut_range in (WIDE, WIDE_BIASED)
    plan = cuda.plan_gemm(*shape, wide=wide, sm_count=sm_count)
    assert (plan.splits > 1) == (sm_count > 1)
    assert runner.kernels == ["lut_gemm_wide" if wide else "lut_gemm_narrow"]
    np.testing.assert_array_equal(out, gemm_oracle(lut, a_idx, b_idx))


@pytest.mark.parametrize("lut_range", [NARROW_SIGNED, WIDE])
def test_depthwise_matches_oracle(emulator, lut_range):
    rng = np.random.default_rng(5)
    lut = lut_spanning(rng, **lut_range)
    a_idx, b_idx = operands(rng, 5, 115, 9, 1)
    runner = emulator()
    out = emulated_gemm(runner, lut, a_idx, b_idx)
    assert runner.kernels == ["lut_depthwise_wide" if lut_range is WIDE else "lut_depthwise_narrow"]
    np.testing.assert_array_equal(out, gemm_oracle(lut, a_idx, b_idx))


def test_depthwise_beyond_its_table_falls_back_to_gemm(emulator, caplog):
    rng = np.random.default_rng(6)
    lut = lut_spanning(rng, **NARROW_SIGNED)
    k = cuda.depthwise_max_k(wide=False) + 1
    a_idx, b_idx = operands(rng, 2, 23, k, 1)
    runner = emulator()
    with caplog.at_level(logging.DEBUG, logger="approxrun.ops.cuda"):
        out = emulated_gemm(runner, lut, a_idx, b_idx)
    assert runner.kernels == ["lut_gemm_narrow"]
    assert "exceeds the depthwise kernel's table" in caplog.text
    np.testing.assert_array_equal(out, gemm_oracle(lut, a_idx, b_idx))


@pytest.mark.parametrize("groups, w_shape, stride, padding, dilation", [
    (2, (4, 3, 3, 2), (2, 1), (1, 2), (1, 2)),  # grouped, strided, dilated, asymmetric padding
    (6, (6, 1, 3, 3), (1, 1), (1, 1), (1, 1)),  # depthwise
])
def test_conv2d_matches_oracle(emulator, groups, w_shape, stride, padding, dilation):
    rng = np.random.default_rng(7)
    lut = lut_spanning(rng, **NARROW_SIGNED)
    x = rng.integers(-128, 128, size=(2, 6, 7, 5))
    w = rng.integers(-128, 128, size=w_shape)
    pad_value = -3  # a nonzero zero point: padding must hold its code, not 0
    runner = emulator()
    out = cuda.conv2d(torch.from_numpy(x), torch.from_numpy(w), cuda.build_image(torch.from_numpy(lut).double()),
                      stride, padding,
                      dilation, groups, pad_value, runner=runner)
    assert runner.kernels[0] == "lut_im2col"
    expected = conv2d_oracle(x, w, lut, stride, padding, dilation, groups, pad_value)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_lut_gradients_match_oracle_and_cpu_path(emulator):
    rng = np.random.default_rng(8)
    lut = lut_spanning(rng, **NARROW_SIGNED)
    da, db = gradient_tables(lut, True, True)
    groups, m, k, n = 2, 23, 9, 7
    a_idx, b_idx = operands(rng, groups, m, k, n)
    grad_out = rng.standard_normal((groups, m, n))
    runner = emulator(sm_count=4)  # several row splits for grad_b
    grad_a, grad_b = cuda.lut_gemm_backward(*map(torch.from_numpy, (grad_out, a_idx, b_idx, da, db)), runner=runner)
    picked_a = da[a_idx[:, :, :, None], b_idx[:, None, :, :]]  # [g, m, k, n]
    picked_b = db[a_idx[:, :, :, None], b_idx[:, None, :, :]]
    np.testing.assert_allclose(grad_a.numpy(), np.einsum("gmkn,gmn->gmk", picked_a, grad_out), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_b.numpy(), np.einsum("gmkn,gmn->gkn", picked_b, grad_out), rtol=1e-12, atol=1e-12)
    cpu_a, cpu_b = grouped_lut_gemm_backward(*map(torch.from_numpy, (grad_out, a_idx, b_idx, da, db)))
    torch.testing.assert_close(grad_a, cpu_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, cpu_b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# host-side planning and images (no kernels)


def test_lut_image_width_and_bias():
    signed = cuda.build_image(torch.from_numpy(exact_lut(True, True)).double())
    assert not signed.wide and signed.bias == -16256 and signed.table.dtype == torch.int16
    unsigned = cuda.build_image(torch.from_numpy(exact_lut(False, False)).double())
    assert not unsigned.wide and unsigned.bias == 0
    # stored entries are lut - bias read as uint16, transposed
    stored = unsigned.table.numpy().view(np.uint16).astype(np.int64)
    np.testing.assert_array_equal(stored.T + unsigned.bias, exact_lut(False, False))
    rng = np.random.default_rng(0)
    assert cuda.build_image(torch.from_numpy(lut_spanning(rng, **NARROW_FULL)).double()).wide is False
    wide = cuda.build_image(torch.from_numpy(lut_spanning(rng, low=0, high=65536)).double())
    assert wide.wide and wide.table.dtype == torch.int32


def test_engine_builds_the_lut_image_once_per_device():
    """The engine owns the image: repeated GEMMs on a raw tensor LUT reuse it (no host round trip)."""
    lut = torch.from_numpy(exact_lut()).double()
    engine = engine_for(lut, engines=EngineRegistry())
    first = engine.cuda_image(torch.device("cpu"))
    assert engine.cuda_image(torch.device("cpu")) is first
    assert engine_for(lut.clone(), engines=EngineRegistry()).cuda_image(torch.device("cpu")) is not first
    np.testing.assert_array_equal(first.table.numpy().view(np.uint16).astype(np.int64).T + first.bias, exact_lut())


def test_gemm_codes_refuses_misaligned_or_strided_operands(emulator):
    """The kernels load 16 codes as one uint4: an operand view that starts off a 16-byte boundary
    (or is strided) would fault on a GPU, so the host refuses it with one line."""
    rng = np.random.default_rng(2)
    image = cuda.build_image(torch.from_numpy(exact_lut()).double())
    a_t = torch.from_numpy(rng.integers(0, 256, size=(1, 8, 33)).astype(np.uint8))
    b = torch.from_numpy(rng.integers(0, 256, size=(1, 8, 5)).astype(np.uint8))
    with pytest.raises(ValueError, match="aligned to 16 bytes"):
        cuda.gemm_codes(a_t.reshape(-1)[1:1 + 8 * 32].view(1, 8, 32), b, 20, image, runner=emulator())
    with pytest.raises(ValueError, match="multiple of 16"):
        cuda.gemm_codes(a_t[:, :, :20].contiguous(), b, 20, image, runner=emulator())
    with pytest.raises(ValueError, match="contiguous"):
        cuda.gemm_codes(a_t[:, :, :32], b, 20, image, runner=emulator())
    aligned = a_t[:, :, :32].contiguous()
    out = cuda.gemm_codes(aligned, b, 20, image, runner=emulator())
    expected = matmul_oracle(aligned[0, :, :20].T.numpy().astype(np.int64), b[0].numpy().astype(np.int64), exact_lut())
    np.testing.assert_array_equal(out[0].numpy(), expected)


def test_lut_image_rejects_fractional_and_huge_luts():
    with pytest.raises(ValueError, match="integer LUT entries"):
        cuda.build_image(torch.full((256, 256), 0.5, dtype=torch.float64))
    huge = torch.zeros(256, 256, dtype=torch.float64)
    huge[0, 0] = 2.0**33
    with pytest.raises(ValueError, match="32 bits"):
        cuda.build_image(huge)


def test_plan_caps_narrow_k_per_block_and_fills_the_gpu():
    plan = cuda.plan_gemm(1, 512, 200_000, 8, wide=False, sm_count=1)
    assert plan.k_per_split <= cuda.NARROW_MAX_K_PER_BLOCK and plan.splits * plan.k_per_split >= 200_000
    small = cuda.plan_gemm(1, 4096, 576, 64, wide=False, sm_count=132)  # 8 row blocks: split k
    assert small.grid[0] == 8 and small.splits > 1 and small.grid[2] == small.splits
    assert small.splits * small.k_per_split >= 576 > (small.splits - 1) * small.k_per_split
    big = cuda.plan_gemm(1, 131072, 144, 16, wide=False, sm_count=132)  # 256 row blocks: whole waves
    assert big.splits == 1 and big.n_tile == 16 and big.k_per_slab == 4


def test_missing_cupy_gives_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(ApproxrunError, match=r"pip install 'approxrun\[cuda\]'") as error:
        cuda._import_cupy()
    assert "\n" not in str(error.value)


def test_cuda_version_clash_names_both_versions(monkeypatch):
    cupy = pytest.importorskip("cupy")
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: 12040)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 13000)
    with pytest.raises(ApproxrunError, match=r"CUDA 13\.0.*CUDA 12\.4.*cupy-cuda12x") as error:
        cuda._import_cupy()
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# 3. on a GPU: CuPy path vs CPU path

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("multiplier_lut", ["signed", "random"])
def test_gpu_lut_matmul_matches_cpu(multiplier_lut):
    from approxrun.ops import lut_matmul

    rng = np.random.default_rng(1)
    lut = exact_lut() if multiplier_lut == "signed" else lut_spanning(rng, **NARROW_SIGNED)
    a = torch.from_numpy(rng.integers(-128, 128, size=(300, 115)))
    b = torch.from_numpy(rng.integers(-128, 128, size=(115, 23)))
    lut_t = torch.from_numpy(lut).double()
    expected = lut_matmul(a, b, lut_t)
    got = lut_matmul(a.cuda(), b.cuda(), lut_t.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("grad", ["ste", "lut"])
def test_gpu_layers_match_cpu(grad):
    from approxrun.layers import ApproxConv2d, ApproxLinear
    from approxrun.multipliers.multiplier import Multiplier

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    multiplier = Multiplier("random", lut_spanning(rng, **NARROW_SIGNED), description="asymmetric random LUT")
    layers = [ApproxConv2d(6, 8, 3, stride=2, padding=1, multiplier=multiplier, grad=grad),
              ApproxConv2d(8, 8, 3, padding=1, groups=8, multiplier=multiplier, grad=grad),
              ApproxLinear(23, 7, multiplier=multiplier, grad=grad)]
    inputs = [torch.randn(3, 6, 11, 9), torch.randn(3, 8, 6, 5), torch.randn(5, 23)]
    for layer, x in zip(layers, inputs):
        layer.train()
        layer.set_mode("quant")
        layer(x)  # calibrate the observers
        layer.set_mode("approx")
        layer.eval()
        gpu = copy.deepcopy(layer).cuda()
        x_cpu = x.clone().requires_grad_()
        x_gpu = x.cuda().requires_grad_()
        y_cpu, y_gpu = layer(x_cpu), gpu(x_gpu)
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
        y_cpu.square().sum().backward()
        y_gpu.square().sum().backward()
        torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu.weight.grad.cpu(), layer.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_gpu_conv2d_matches_cpu_lut_conv2d():
    from approxrun.ops import lut_conv2d

    rng = np.random.default_rng(3)
    lut = torch.from_numpy(lut_spanning(rng, **WIDE)).double()
    x = torch.from_numpy(rng.integers(-128, 128, size=(4, 16, 15, 13)))
    w = torch.from_numpy(rng.integers(-128, 128, size=(24, 8, 3, 3)))
    expected = lut_conv2d(x, w, lut, stride=2, padding=1, groups=2, pad_value=7).double()
    got = cuda.conv2d(x.cuda(), w.cuda(), cuda.build_image(lut.cuda()), stride=2, padding=1, groups=2, pad_value=7)
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
