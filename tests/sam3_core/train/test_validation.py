"""In-loop validation on 1, 2 and 3 torchrun ranks (gloo) with clips and frames that do not divide evenly.

Each rank takes clips r, r + W, ...: with 1-5 clips on 2 or 3 ranks some ranks get one fewer
clip, or none. sam3's training loss all-reduces the box count once per frame; when validation
used it, a rank with fewer clips left that collective unmatched and gloo aborted ("collective
mismatch"). Every count of clips and frames must give the metrics of one process, and training
must run to its end, validating at its last step.

The runs train with a learning rate (1e-12) below the float32 resolution of the weights, so the
weights after the steps are the starting ones on every world size and the final validation can be
compared across world sizes too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sam3_core.data.prep import DataPrepConfig, PreparedDataset, prepare_dataset
from sam3_core.data.synthetic import SyntheticConfig
from tests.fixtures.datasets import TINY_MODEL, TINY_TRAIN, single_thread_env
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO

pytestmark = pytest.mark.integration

WORLD_SIZES = (1, 2, 3)
STEPS = 2
# 2 val videos x 6 frames: 6 clips of 2 frames, 12 frames
VIDEOS = SyntheticConfig(
    num_videos=6, frames_per_video=6, height=64, width=64, min_objects=1, max_objects=2, min_size=14, max_size=30
)
COUNTS = range(1, 6)
# a rank left waiting in an unmatched collective gives up after this (the defect hung until it)
COLLECTIVE_TIMEOUT_S = 240


def run_torchrun(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run torchrun in a session of its own: a timeout kills its workers too, not only torchrun."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=single_thread_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def val_dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    store = tmp_path_factory.mktemp("uneven-val-store")
    return prepare_dataset(DataPrepConfig(source="synthetic", synthetic=VIDEOS, store=str(store), val_fraction=0.34))


@pytest.fixture(scope="module")
def runs(val_dataset: PreparedDataset, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """What rank 0 of each world size recorded (see validation_worker.py)."""
    records = {}
    for world in WORLD_SIZES:
        out = tmp_path_factory.mktemp(f"uneven-val-{world}")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(Path(__file__).with_name("validation_worker.py")),
            str(out),
            f"data.uri={val_dataset.uri}",
            *TINY_MODEL,
            *TINY_TRAIN,
            f"output.store={out / 'store'}",
            "output.run_name=uneven",
            "optim.lr=1e-12",
            f"train.max_steps={STEPS}",
            f"train.val_every={STEPS}",
            f"train.checkpoint_every={STEPS}",
            f"train.val_max_clips={max(COUNTS)}",
            f"train.val_max_frames={max(COUNTS)}",
            f"train.dist_timeout_s={COLLECTIVE_TIMEOUT_S}",
        ]
        proc = run_torchrun(command, timeout_s=2 * COLLECTIVE_TIMEOUT_S)
        assert proc.returncode == 0, f"{world} rank(s):\n{proc.stderr[-4000:]}"
        records[world] = json.loads((out / "metrics.json").read_text())
    return records


def test_every_world_size_trains_to_the_end_and_validates_at_the_last_step(runs: dict[int, dict[str, Any]]) -> None:
    for world, record in runs.items():
        assert (record["world_size"], record["steps"]) == (world, STEPS)
        assert {"val/loss", "val/bbox_AP", "val/segm_AP"} <= set(record["final"]), world


@pytest.mark.parametrize("world", WORLD_SIZES[1:])
@pytest.mark.parametrize("count", COUNTS)
def test_loss_and_coco_metrics_of_any_count_of_clips_and_frames_equal_one_process(
    runs: dict[int, dict[str, Any]], world: int, count: int
) -> None:
    expected = runs[1]["per_count"][str(count)]
    got = runs[world]["per_count"][str(count)]
    assert "loss" in expected and "bbox_AP" in expected
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("world", WORLD_SIZES[1:])
def test_the_last_steps_validation_equals_one_process(runs: dict[int, dict[str, Any]], world: int) -> None:
    def val(record: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in record["final"].items() if k.startswith("val/")}

    assert val(runs[world]) == pytest.approx(val(runs[1]), rel=1e-6, abs=1e-9)
