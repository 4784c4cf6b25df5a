"""benchmarks/gpipe.py: a 2-stage GPipe pipeline (torch.distributed.pipelining, gloo) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.pipelining")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpipe.py"


def run_gpipe(tmp_path: Path, name: str, *args: str) -> dict:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--model-widths", "4,8", "--batch-size", "16", "--threads", "1",
           "--isolated-reps", "2", "--out", str(out), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def check_speed_fields(result: dict, microbatches: int, batch: int = 16):
    assert result["config"]["K"] == 2 and result["config"]["microbatches"] == microbatches
    assert result["overall"]["images_per_s"] > 0
    stages = result["stages"]
    assert [s["stage"] for s in stages] == [0, 1]
    for s in stages:
        assert s["images_per_s"] > 0
        assert 0 < s["busy_fraction"] <= 1, s
        assert 0 < s["isolated_busy_fraction"] <= 1, s
    # stage 0 sends its 4x14x14 fp32 activation forward, stage 1 its gradient back
    activation = 4 * 14 * 14 * 4
    assert stages[0]["bytes_sent_forward_per_image"] == activation and stages[0]["bytes_sent_backward_per_image"] == 0
    assert stages[1]["bytes_sent_backward_per_image"] == activation and stages[1]["bytes_sent_forward_per_image"] == 0
    assert len(result["losses"]) == result["config"]["warmup"] + result["config"]["steps"]


def check_gradients(result: dict):
    check = result["grad_check"]
    # every stage moved (a stage that got no gradient would not) ...
    assert check["min_stage_param_update"] > 1e-5, check
    # ... as the non-pipelined network did (on CPU the results are bitwise equal; wrong gradient
    # scaling, e.g. scale_grads=False, gives differences of the order of the update, 1e-2)
    assert check["max_param_diff"] <= 1e-6, check
    assert check["max_buffer_diff"] <= 1e-6, check


def test_one_microbatch_matches_plain_backprop(tmp_path):
    result = run_gpipe(tmp_path, "mb1", "--microbatches", "1", "--steps", "4", "--warmup", "1", "--check-grads")
    check_speed_fields(result, 1)
    check_gradients(result)


def test_microbatches_match_accumulated_backprop_and_loss_falls(tmp_path):
    # lr and steps such that the class-template data is learnt visibly within the run
    result = run_gpipe(tmp_path, "mb4", "--microbatches", "4", "--steps", "20", "--warmup", "1",
                       "--lr", "0.05", "--momentum", "0.9", "--check-grads")
    check_speed_fields(result, 4)
    check_gradients(result)
    losses = result["losses"]
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
