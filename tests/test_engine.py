"""Raw tables wherever the API takes a multiplier (issue 13): the TorchApprox quick start's steps."""

import numpy as np
import pytest
import torch

import approxrun
from approxrun.multipliers import Multiplier
from approxrun.ops import DEFAULT_ENGINES, engine_for


def tiny_model():
    torch.manual_seed(0)
    return approxrun.approximate(torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Flatten(),
                                                     torch.nn.Linear(3 * 5 * 5, 4)))


def torchapprox_lut() -> np.ndarray:
    x = np.arange(256)
    x[x >= 128] -= 256
    xx, yy = np.meshgrid(x, x)
    return xx * yy


@pytest.mark.parametrize("as_tensor", [False, True])
def test_set_multiplier_takes_a_raw_table(as_tensor):
    """The quick start's ``xx * yy`` (the exact signed product) as a numpy array or float tensor
    gives the same outputs as the exact Multiplier; an asymmetric raw table is kept as given."""
    lut = torchapprox_lut()
    x = torch.randn(6, 2, 5, 5)
    outputs = []
    for table in (torch.as_tensor(lut, dtype=torch.float32) if as_tensor else lut, Multiplier.exact()):
        model = tiny_model()
        approxrun.set_mode(model, "quant")
        model(x)
        approxrun.set_multiplier(model, table)
        approxrun.set_mode(model, "approx")
        outputs.append(model(x))
        layers = [layer for _, layer in approxrun.approx_layers(model)]
        assert all(layer.multiplier is layers[0].multiplier for layer in layers)  # one engine for all
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    skewed = lut + np.arange(256)[None, :]
    model = tiny_model()
    approxrun.set_multiplier(model, skewed, signed_a=False)
    multiplier = approxrun.approx_layers(model)[0][1].multiplier
    assert np.array_equal(multiplier.lut, skewed) and not multiplier.domain_a.signed and multiplier.domain_b.signed


def test_set_multiplier_rejects_bad_tables():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(256, 256\)"):
        approxrun.set_multiplier(model, np.zeros((16, 16)))
    with pytest.raises(ValueError, match="whole numbers"):
        approxrun.set_multiplier(model, np.full((256, 256), 0.5))


def test_default_registry_reuses_the_engine_of_a_raw_tensor():
    lut = torch.as_tensor(torchapprox_lut(), dtype=torch.float64)
    a, b = torch.randint(-128, 128, (5, 7)), torch.randint(-128, 128, (7, 3))
    out = approxrun.lut_matmul(a, b, lut)
    assert engine_for(lut) is engine_for(lut) is DEFAULT_ENGINES.engine_for(lut)
    assert torch.equal(out, (a @ b))


def test_calibrate_command_shows_the_machine_figures(capsys):
    from approxrun.lut_tool import main
    from approxrun.ops.lowrank.calibration import cpu_description

    assert main(["calibrate"]) == 0
    out = capsys.readouterr().out
    assert cpu_description()["model"] in out and "float32 GEMM: N=8" in out and "int8 GEMM exact" in out


def test_workspace_reuses_grows_and_keeps_threads_apart():
    """Scratch memory by name: a smaller request reuses the same storage, a larger one grows it,
    another name or thread gets its own; copies and pickles of a workspace start empty."""
    import copy
    import pickle
    import threading

    from approxrun.ops.im2col import Workspace, scratch

    workspace = Workspace()
    first = workspace.tensor("rows", (4, 8), torch.int32, "cpu")
    again = workspace.tensor("rows", (3, 5), torch.int32, "cpu")
    assert again.data_ptr() == first.data_ptr() and again.shape == (3, 5)
    grown = workspace.tensor("rows", (100,), torch.int32, "cpu")
    assert grown.numel() == 100 and workspace.tensor("maps", (4, 8), torch.int32, "cpu").data_ptr() != grown.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(workspace.tensor("rows", (100,), torch.int32, "cpu")))
    thread.start()
    thread.join()
    assert other[0].data_ptr() != grown.data_ptr()
    for twin in (copy.deepcopy(workspace), pickle.loads(pickle.dumps(workspace))):
        assert twin.tensor("rows", (100,), torch.int32, "cpu").data_ptr() != grown.data_ptr()
    assert scratch(None, "rows", (2, 3), torch.float32, "cpu").shape == (2, 3)  # no workspace: a fresh tensor


def test_each_engine_owns_its_scratch_memory_and_copies_of_models_work():
    """No process-wide scratch: two engines' GEMMs fill their own workspaces, and a model whose
    layers hold engines deep-copies (scratch is not copied) and gives the same outputs."""
    import copy

    from approxrun.ops import LutEngine, lut_matmul

    rng = np.random.default_rng(5)
    lut = torchapprox_lut() + rng.integers(-3, 4, (256, 1)) @ rng.integers(-3, 4, (1, 256))  # error of rank 1
    a, b = torch.as_tensor(rng.integers(-128, 128, (37, 300))), torch.as_tensor(rng.integers(-128, 128, (300, 9)))
    engines = [LutEngine(lut, strategy="lowrank", routes=("float32",), native=False) for _ in range(2)]
    outs = [lut_matmul(a, b, engine) for engine in engines]
    assert torch.equal(outs[0], outs[1])
    buffers = [engine.workspace._threads.buffers for engine in engines]
    assert buffers[0] and buffers[1] and all(buffers[0][key] is not buffers[1][key] for key in buffers[0])
    model, x = tiny_model(), torch.randn(2, 2, 5, 5)
    approxrun.set_mode(model, "quant")
    model(x)
    approxrun.set_multiplier(model, lut)
    approxrun.set_mode(model, "approx")
    model.eval()  # no observer updates: equal inputs give equal outputs
    out = model(x)  # the layers' engine has run (and filled its workspace)
    twin = copy.deepcopy(model)
    engine = approxrun.approx_layers(model)[0][1].multiplier.engine
    assert approxrun.approx_layers(twin)[0][1].multiplier.engine is not engine
    assert torch.equal(twin(x), out)
