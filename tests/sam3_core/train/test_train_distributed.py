"""Two-process training on CPU (gloo) under torchrun: ranks stay in lock-step and share out the clips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import load_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker_training import build_video_clip_model
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from tests.fixtures.datasets import single_thread_env
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO

# every test here starts processes, servers or trainings (the integration tier)
pytestmark = pytest.mark.integration

RANKS = 2
# 3 train videos x 4 frames, 2-frame clips: 6 clips; one clip per rank per step
CLIPS_PER_EPOCH = 6
EPOCHS = 2
STEPS = EPOCHS * CLIPS_PER_EPOCH // RANKS


@pytest.fixture(scope="module")
def two_ranks(tiny_train_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Final weights and the clips each rank loaded, after a 2-epoch run on 2 processes."""
    out = tmp_path_factory.mktemp("two-ranks")
    store = out / "store"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(RANKS),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(Path(__file__).with_name("train_worker.py")),
        str(out),
        *tiny_train_overrides,
        f"output.store={store}",
        "output.run_name=ddp",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={STEPS}",
    ]
    proc = subprocess.run(
        command, check=False, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "weights": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)],
        "records": [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)],
        "checkpoint": load_checkpoint(str(store / "runs" / "ddp" / "checkpoints" / "last.pt")),
    }


def test_both_ranks_join_one_process_group(two_ranks: dict[str, Any]) -> None:
    assert [record["world_size"] for record in two_ranks["records"]] == [RANKS] * RANKS


def test_only_rank_zero_reports_metrics_and_validation_is_reported_once_at_the_last_step(
    two_ranks: dict[str, Any],
) -> None:
    reported = [record["metrics"] for record in two_ranks["records"]]
    assert reported[1] == [] and reported[0]
    # both ranks validated their share of the val clips and frames; rank 0 reports the result once
    assert [m["step"] for m in reported[0] if "val/loss" in m] == [STEPS]
    assert [m["step"] for m in reported[0] if "val/segm_AP" in m] == [STEPS]


def test_weights_are_identical_on_every_rank_after_training(two_ranks: dict[str, Any]) -> None:
    first, second = two_ranks["weights"]
    assert first.keys() == second.keys()
    assert [k for k in first if not torch.equal(first[k], second[k])] == []


def test_training_moved_the_weights_away_from_the_initial_ones(two_ranks: dict[str, Any]) -> None:
    initial = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56))).state_dict()
    trained = two_ranks["weights"][0]
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_rank_zero_checkpoints_the_shared_weights(two_ranks: dict[str, Any]) -> None:
    checkpoint = two_ranks["checkpoint"]
    assert checkpoint["step"] == STEPS
    assert checkpoint["world_size"] == RANKS
    assert len(checkpoint["rng"]) == RANKS
    weights = two_ranks["weights"][0]
    assert all(torch.equal(checkpoint["model"][k], weights[k]) for k in weights)


@pytest.mark.parametrize("epoch", range(EPOCHS))
def test_the_ranks_together_load_every_clip_once_per_epoch(two_ranks: dict[str, Any], epoch: int) -> None:
    per_rank = [record["seen"][str(epoch)] for record in two_ranks["records"]]
    assert [len(indices) for indices in per_rank] == [CLIPS_PER_EPOCH // RANKS] * RANKS
    assert sorted(per_rank[0] + per_rank[1]) == list(range(CLIPS_PER_EPOCH))


@pytest.fixture(scope="module")
def two_ranks_tracker(tiny_train_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Final weights and reported metrics of a 2-step train.stage=tracker run on 2 processes."""
    out = tmp_path_factory.mktemp("two-ranks-tracker")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(RANKS),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(Path(__file__).with_name("train_worker.py")),
        str(out),
        *tiny_train_overrides,
        f"output.store={out / 'store'}",
        "output.run_name=ddp-tracker",
        "train.stage=tracker",
        "data.tracker_clips.frames_per_clip=3",
        "data.tracker_clips.correction_points=2",
        "train.max_steps=2",
        "train.val_every=2",
        "train.best_metric=val/vos_JF_mean",
    ]
    proc = subprocess.run(
        command, check=False, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "weights": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)],
        "records": [json.loads((out / f"rank{r}.json").read_text()) for r in range(RANKS)],
    }


def test_stage_tracker_keeps_both_ranks_identical_and_reports_vos_validation_once(
    two_ranks_tracker: dict[str, Any], tiny_train_overrides: list[str]
) -> None:
    first, second = two_ranks_tracker["weights"]
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    model = load_config("train", TrainConfig, tiny_train_overrides).model
    initial = build_video_clip_model(model).state_dict()
    assert any(not torch.equal(first[k], initial[k]) for k in initial if k.startswith("tracker."))
    assert all(torch.equal(first[k], initial[k]) for k in initial if k.startswith("detector."))
    reported = [record["metrics"] for record in two_ranks_tracker["records"]]
    assert reported[1] == [] and [m["step"] for m in reported[0] if "val/vos_JF_mean" in m] == [2]


@pytest.mark.integration
def test_the_starting_weights_are_read_by_rank_zero_alone_and_reach_every_rank(
    tiny_train_overrides: list[str], s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fixtures.fault_proxy import FaultProxy

    # weights no rank builds by itself (another init seed), published in the object store
    start = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=7)))
    weights = start.state_dict()
    torch.save({"model": weights}, tmp_path / "start.pt")
    uri = f"{s3_bucket}/weights/start.pt"
    storage.upload_file(tmp_path / "start.pt", uri)
    proxy = FaultProxy(s3_server, fault_rate=0.0, max_latency_s=0.0)
    proxy.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # one GET per download (not ranged parts), so GETs count downloads
        monkeypatch.setenv("SAM3PIPE_MULTIPART_THRESHOLD_MB", "1024")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(RANKS),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(Path(__file__).with_name("train_worker.py")),
            str(tmp_path),
            *tiny_train_overrides,
            f"model.uri={uri}",
            f"output.store={tmp_path / 'store'}",
            # a step too small to move float32 weights: what each rank ends with is what it started from
            "optim.lr=1e-12",
            "train.max_steps=1",
            "train.val_every=0",
            "train.best_metric=train/loss",
        ]
        proc = subprocess.run(
            command, check=False, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600
        )
    finally:
        proxy.stop()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [path for method, path, _ in proxy.requests if method == "GET" and path.endswith("/start.pt")] == [
        uri.removeprefix("s3:/")
    ]
    for rank in range(RANKS):
        final = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert all(torch.allclose(final[k], weights[k], rtol=0, atol=1e-6) for k in weights), rank
