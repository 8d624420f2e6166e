"""Deterministic kernels (`train.deterministic`): two runs of one command end with the same weights.

With 2 torch threads on CPU, the backward of indexing image features by prompt used parallel
atomic adds, so runs parted after a few steps, and a run tracked in MLflow parted from an
untracked one (sam3_core/train/determinism.py). The unit tests pin the switch and torch's
behaviour the fix relies on; the integration test trains twice with 2 threads, once tracked and
once not, in separate processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sam3_core.data.prep import PreparedDataset
from sam3_core.model.checkpoint import load_checkpoint
from sam3_core.train.determinism import use_deterministic_kernels
from tests.fixtures.datasets import TINY_MODEL
from tests.fixtures.paths import REPO

SUBPROCESS_TIMEOUT_S = 600


@pytest.fixture
def restored_torch_settings() -> Iterator[None]:
    """Put torch's deterministic flag and thread count back after the test."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("mode", "on"), [("auto", True), ("on", True), ("off", False)])
def test_on_cpu_auto_and_on_turn_deterministic_kernels_on_and_off_turns_them_off(
    restored_torch_settings: None, mode: str, on: bool
) -> None:
    torch.use_deterministic_algorithms(not on)
    assert use_deterministic_kernels(mode, torch.device("cpu")) is on
    assert torch.are_deterministic_algorithms_enabled() is on


def _gradient_of_indexing_by_prompt(threads: int) -> torch.Tensor:
    """d/d features of features[prompt_frames]: 12 prompts read 4 frames, so each frame's gradient sums 3 of them."""
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(4, 64, 32, 32, generator=generator, requires_grad=True)
    prompt_frames = torch.tensor([0, 1, 2, 3] * 3)
    upstream = torch.randn(12, 64, 32, 32, generator=generator)
    (features[prompt_frames] * upstream).sum().backward()
    assert features.grad is not None
    return features.grad


def test_with_deterministic_kernels_two_threads_sum_the_prompts_gradients_as_one_thread_does(
    restored_torch_settings: None,
) -> None:
    use_deterministic_kernels("auto", torch.device("cpu"))
    one_thread = _gradient_of_indexing_by_prompt(1)
    # torch's parallel atomic adds matched the serial sum in about half of the tries: five tries
    assert all(torch.equal(_gradient_of_indexing_by_prompt(2), one_thread) for _ in range(5))


def _train(overrides: list[str], store: Path, tracked: bool) -> dict[str, torch.Tensor]:
    command = [
        sys.executable,
        "-m",
        "components.train",
        *overrides,
        f"output.store={store}",
        f"mlflow.enabled={'true' if tracked else 'false'}",
    ]
    # threads that sleep at OpenMP barriers rather than spin: on a busy machine two spinning threads made
    # a step 20x slower (38 s against 1.7 s); the arithmetic is the same
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return load_checkpoint(str(next(store.glob("runs/*/checkpoints/last.pt"))))["model"]


@pytest.mark.integration
def test_two_runs_on_two_threads_one_tracked_in_mlflow_end_with_the_same_weights(
    tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    # 2 clips of 2 frames with up to 2 objects and a negative prompt: frames with several prompts
    overrides = [
        f"data.uri={tiny_dataset.uri}",
        *TINY_MODEL,
        "data.batch_size=2",
        "data.clips.frames_per_clip=2",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "train.max_steps=8",
        "train.val_every=0",
        "train.best_metric=train/loss",
        "train.best_mode=min",
        "train.num_threads=2",
    ]
    untracked = _train(overrides, tmp_path / "untracked", tracked=False)
    tracked = _train(overrides, tmp_path / "tracked", tracked=True)
    assert untracked.keys() == tracked.keys()
    assert [name for name in untracked if not torch.equal(untracked[name], tracked[name])] == []
