"""``approxrun multiplier=<EvoApproxLib name>`` end to end, with EVOAPPROX_ROOT at the test checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from approxrun.multipliers import evoapprox

DATA = Path(__file__).parent / "data" / "evoapprox"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not any(map(shutil.which, evoapprox.COMPILERS)), reason="needs a C compiler")]


def test_smoke_run_with_an_evoapprox_circuit(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, EVOAPPROX_ROOT=str(DATA), APPROXRUN_CACHE=str(tmp_path / "luts"))
    result = subprocess.run(["approxrun", "multiplier=mul8s_1L2D", "experiment=smoke", f"hydra.run.dir={run_dir}",
                             f"cache.dir={tmp_path / 'stage-cache'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert list((tmp_path / "luts").glob("mul8s_1L2D-*.npz")), "the LUT was built from the C model and cached"
    # the catalogue entry's published power, relative to the exact multiplier's 0.425 mW
    assert metrics["stages"]["approx"]["relative_energy"] == pytest.approx(0.200 / 0.425)
