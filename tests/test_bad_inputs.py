"""Bad-input corpus through ``approxrun``'s command-line entry point: broken LUT files, bad config
values (found while composing or after), a C model that does not compile, unusable initial weights.

Each case must end with exactly one stderr line ``approxrun: error: ...`` naming the input and the
problem, exit status 2 for a bad config and 1 for a run that fails, and no partial output: no stage
checkpoint, resume state, stage-cache or LUT-cache entry, or temporary file (a ``metrics.json``
saying ``failed`` is the job's record). ``tests/test_cli.py`` runs a few more through the installed
command (unknown model and multiplier, negative epochs as a model default, a missing LUT file, an
unknown key, a missing dataset).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

BROKEN_C_MODEL = """// MAE% = 0.0 %
#include <stdint.h>
int16_t mul8s_BAD(int8_t A, int8_t B)
{
  return A * B +;
}
"""


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def _torch(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _table_text(rows: int, garbage_at: tuple[int, int] | None = None) -> str:
    table = [[str((r - 128) * (c - 128)) for c in range(256)] for r in range(rows)]
    if garbage_at is not None:
        table[garbage_at[0]][garbage_at[1]] = "0x1z"
    return "".join(" ".join(row) + "\n" for row in table)


def _write_corpus(folder: Path) -> None:
    """The broken files the cases point at."""
    values = np.arange(256) - 256 * (np.arange(256) > 127)  # byte index -> signed code
    exact = np.multiply.outer(values, values).astype(np.int32)
    nan = exact.astype(np.float64)
    nan[3, 5] = np.nan
    huge = exact.astype(np.int64)
    huge[7, 9] = 2**40
    files = {
        "truncated.npy": _npy(exact)[: 128 + 1000],
        "wrong_shape.npy": _npy(exact[:255]),
        "wrong_count.txt": _table_text(255).encode(),
        "garbage.txt": _table_text(256, garbage_at=(6, 2)).encode(),
        "binary_garbage.txt": bytes(range(256)) * 7,
        "nan.npy": _npy(nan),
        "beyond_int32.npy": _npy(huge),
        "pickled.npy": _npy(np.array([{"lut": exact}], dtype=object), allow_pickle=True),
        "empty.npy": b"",
        "truncated.pt": _torch({"weight": torch.zeros(64, 64)})[:300],
        "code.pt": pickle.dumps({"weight": print}),
        "other_model.pt": _torch({"weight": torch.zeros(3, 3)}),
        C_MODEL: BROKEN_C_MODEL.encode(),
    }
    for name, payload in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)


C_MODEL = "evoapprox/multiplers/8x8_signed/pareto_pwr_mae/mul8s_BAD.c"


def _lut(name: str, *problem: str) -> tuple[list[str], list[str]]:
    return ["multiplier=file", f"multiplier.path={{corpus}}/{name}"], [f"{{corpus}}/{name}", *problem]


def _checkpoint(name: str, *problem: str) -> tuple[list[str], list[str]]:
    return ["schedule=eval", f"checkpoint={{corpus}}/{name}"], [f"{{corpus}}/{name}", *problem]


# case -> (arguments, substrings of the error line); {corpus} is the folder _write_corpus filled
CASES = {
    "lut_truncated": _lut("truncated.npy", "not a valid .npy file"),
    "lut_wrong_shape": _lut("wrong_shape.npy", "shape (255, 256), expected (256, 256)"),
    "lut_wrong_row_count": _lut("wrong_count.txt", "255 rows, expected 256"),
    "lut_text_garbage": _lut("garbage.txt", "row 7, column 3", "'0x1z' is not an integer"),
    "lut_binary_garbage": _lut("binary_garbage.txt", "not a text file"),
    "lut_nan": _lut("nan.npy", "NaN"),
    "lut_beyond_int32": _lut("beyond_int32.npy", "beyond the int32 range"),
    "lut_pickled": _lut("pickled.npy", "pickled objects"),
    "lut_empty": _lut("empty.npy", "empty"),
    "unknown_dataset": (["dataset=imagenet_22k"], ["dataset=imagenet_22k", "unknown dataset"]),
    "bits_zero": (["quant.bits_b=0"], ["quant.bits_b=0", "from 2 to 8"]),
    "negative_schedule_epochs": (["++schedule.stages.approx.epochs=-4"], ["stage approx", "epochs=-4"]),
    "misspelt_stage_setting": (["schedule=agn", "++schedule.stages.gradient.lmdb=0.5"],
                               ["schedule.stages.gradient.lmdb", "not a setting of a gradient stage", "lmbd"]),
    "unknown_lut_strategy": (["lut.strategy=fastest"], ["lut.strategy='fastest'", "auto, gather, lowrank"]),
    "negative_lookup_cost": (["lut.lookup_cost=-2"], ["lut.lookup_cost=-2", "a number > 0"]),
    "c_model_does_not_compile": (["multiplier=mul8s_BAD"], [f"{{corpus}}/{C_MODEL}", "does not compile"]),
    "seed_not_a_number": (["seed=abc"], ["seed=abc", "could not be converted to Integer"]),
    "bits_a_nine": (["quant.bits_a=9"], ["quant.bits_a=9", "from 2 to 8"]),
    "negative_learning_rate": (["model.train.quant.optimizer.lr=-1"],
                               ["model.train.quant.optimizer.lr=-1", "a number > 0"]),
    "misspelt_section_key": (["quant.bitz=3"], ["quant.bitz", "not a config key", "bits_a"]),
    "stage_setting_of_wrong_type": (["schedule=agn", "schedule.stages.gradient.lmbd=lots"],
                                    ["schedule.stages.gradient.lmbd=lots", "Float"]),
    "unknown_optimizer": (["model.train.baseline.optimizer.name=rmsprop"],
                          ["model.train.baseline.optimizer.name='rmsprop'", "sgd, adam, adamw"]),
    "initial_weights_missing": (["schedule=eval", "init_weights={corpus}/missing.pt"],
                                ["{corpus}/missing.pt", "no such file"]),
    "checkpoint_missing": _checkpoint("missing.pt", "no such file"),
    "checkpoint_truncated": _checkpoint("truncated.pt", "not a readable weights-only torch checkpoint"),
    "checkpoint_with_code": _checkpoint("code.pt", "not a readable weights-only torch checkpoint"),
    "checkpoint_of_another_model": _checkpoint("other_model.pt", "does not fit the model"),
}

# A bad config is a usage error (exit status 2); the other cases are runs that fail (exit status 1).
CONFIG_CASES = {"unknown_dataset", "bits_zero", "negative_schedule_epochs", "misspelt_stage_setting",
                "unknown_lut_strategy", "negative_lookup_cost", "seed_not_a_number", "bits_a_nine",
                "negative_learning_rate", "misspelt_section_key", "stage_setting_of_wrong_type", "unknown_optimizer"}

# Runs approxrun.cli.main (what the installed command calls) once per case in one process, so the
# ~5 s import of torch and torchvision is paid once; stderr (file descriptor 2) goes to a file per case.
DRIVER = """
import json, os, sys
from hydra.core.global_hydra import GlobalHydra
from approxrun import cli

for case in json.loads(sys.argv[1]):
    err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    saved = os.dup(2)
    os.dup2(err, 2)
    os.close(err)
    sys.argv = ["approxrun", *case["args"]]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        cli._failures.clear()
        GlobalHydra.instance().clear()
    print(json.dumps({"case": case["id"], "code": code}), flush=True)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict:
    """Every case run once, sharing one stage cache and one LUT cache."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus, cache_dir, lut_cache = root / "corpus", root / "stage_cache", root / "lut_cache"
    _write_corpus(corpus)
    common = ["dataset=synthetic", "device=cpu", f"cache.dir={cache_dir}", f"data_dir={root / 'data'}"]
    cases = [{"id": case, "stderr": str(root / f"{case}.stderr"),
              "args": common + [a.format(corpus=corpus) for a in args] + [f"hydra.run.dir={root / 'runs' / case}"]}
             for case, (args, _) in CASES.items()]
    env = dict(os.environ, EVOAPPROX_ROOT=str(corpus / "evoapprox"), APPROXRUN_CACHE=str(lut_cache),
               OMP_NUM_THREADS="1")
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    codes = {r["case"]: r["code"] for r in map(json.loads, (ln for ln in driver.stdout.splitlines()
                                                            if ln.startswith('{"case"')))}
    return {"codes": codes, "root": root, "corpus": corpus, "cache_dir": cache_dir, "lut_cache": lut_cache}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_line_and_no_partial_output(outcomes, case):
    root, run_dir = outcomes["root"], outcomes["root"] / "runs" / case
    assert outcomes["codes"][case] == (2 if case in CONFIG_CASES else 1)
    stderr = (root / f"{case}.stderr").read_text()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert line.startswith("approxrun: error: ")
    for part in CASES[case][1]:
        assert part.format(corpus=outcomes["corpus"]) in line, line
    if run_dir.exists():
        leftovers = sorted(p.name for p in run_dir.iterdir()
                           if p.name not in (".hydra", "approxrun.log", "metrics.json"))
        assert leftovers == [], f"partial output: {leftovers}"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        assert metrics["status"] == "failed" and metrics["error"] in line


def test_no_case_left_a_cache_entry(outcomes):
    assert set(outcomes["codes"]) == set(CASES)
    for cache in (outcomes["cache_dir"], outcomes["lut_cache"]):
        assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
