"""The SAM3 trainer on the tiny synthetic dataset: it learns, validates, picks its best checkpoint,
resumes exactly, refuses another config's run folder, writes its run folder, runs on S3.

The loop's own behaviour (periods, best selection, resume cursor, NaN stop, two ranks) is
specified with a toy model in test_trainer_loop.py; here the real model runs few, short steps.
In-process runs call the same `train()` / `execute()` / `main()` the CLI calls; the run that is
killed and the missing-input test run `python -m components.train` as a real subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from components.train import execute, main
from sam3_core import storage
from sam3_core.config import load_config, to_yaml
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.errors import ConfigError, InputError
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import load_checkpoint, load_model_weights, staging_dir
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.build import UNREACHED, build_trainer, train
from sam3_core.train.config import TrainConfig
from sam3_core.train.run import run_uri_for
from sam3_core.train.trainer import TrainResult
from tests.fixtures.datasets import (
    TINY_MODEL,
    TINY_TRAIN,
    TINY_VIDEOS,
    single_thread_env,
)
from tests.fixtures.paths import REPO

STEPS = 12
WINDOW = 4
# 3 train videos x 4 frames, 2-frame clips: 6 clips per epoch
CLIPS_PER_EPOCH = 6
SUBPROCESS_TIMEOUT_S = 300
# the component's MLflow tracking is tested in test_tracking_components.py; here it would only cost time
NO_TRACKING = ["mlflow.enabled=false"]


def config(overrides: list[str]) -> TrainConfig:
    return load_config("train", TrainConfig, overrides)


def train_command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "components.train", *overrides]


def sha256_of(uri: str) -> str:
    return storage.sha256_bytes(storage.read_bytes(uri))


@pytest.fixture(scope="module")
def finished_run(
    tiny_train_overrides: list[str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], TrainResult]:
    """A complete 12-step run (log window 4, checkpoint and validation every 6) and the overrides that made it."""
    store = tmp_path_factory.mktemp("train-store")
    overrides = [
        *tiny_train_overrides,
        f"output.store={store}",
        f"train.max_steps={STEPS}",
        f"train.log_every={WINDOW}",
        "train.checkpoint_every=6",
        "train.val_every=6",
    ]
    return overrides, train(config(overrides))


@pytest.mark.integration
def test_training_loss_falls_clearly_within_twelve_steps(finished_run: tuple[list[str], TrainResult]) -> None:
    # margin checked over seeds 0-6: last/first window ratio 0.57-0.77
    history = finished_run[1].history
    losses = [record["train/loss"] for record in history if "train/loss" in record]
    assert [record["step"] for record in history if "train/loss" in record] == [4, 8, 12]
    assert losses[-1] < 0.85 * losses[0], losses


def test_every_log_window_reports_all_six_loss_terms(finished_run: tuple[list[str], TrainResult]) -> None:
    terms = {
        "train/loss_bbox",
        "train/loss_giou",
        "train/loss_ce",
        "train/presence_loss",
        "train/loss_mask",
        "train/loss_dice",
    }
    for record in finished_run[1].history:
        if "train/loss" not in record:
            continue
        assert terms <= set(record)
        assert all(torch.isfinite(torch.tensor(record[t])) for t in terms)


def test_run_folder_holds_config_metrics_and_best_last_and_step_checkpoints(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    result = finished_run[1]
    assert set(storage.list_files(result.run_uri)) >= {
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "checkpoints/step_0000006.pt",
        "checkpoints/step_0000012.pt",
    }
    assert result.last_checkpoint_uri == storage.join(result.run_uri, "checkpoints", "last.pt")
    assert result.best_checkpoint_uri == storage.join(result.run_uri, "checkpoints", "best.pt")


def test_config_yaml_is_the_resolved_config(finished_run: tuple[list[str], TrainResult]) -> None:
    overrides, result = finished_run
    assert storage.read_text(storage.join(result.run_uri, "config.yaml")) == to_yaml(config(overrides))


def test_checkpoint_holds_model_optimizer_schedule_step_rng_data_position_hooks_and_config(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    state = load_checkpoint(finished_run[1].last_checkpoint_uri)
    assert state["step"] == STEPS
    assert all(key.startswith("detector.") for key in state["model"])
    assert len(state["optimizer"]["state"]) > 0
    assert state["scheduler"]["last_epoch"] == STEPS
    assert isinstance(state["rng"][0]["torch"], torch.Tensor)
    # (epoch, micro-batch in epoch) is where the data stream goes on: one clip per step
    assert state["data"]["epoch"] * CLIPS_PER_EPOCH + state["data"]["micro_in_epoch"] == STEPS
    assert state["hooks"]["BestCheckpoint"]["metric"] == "val/segm_AP"
    assert yaml.safe_load(state["config"])["train"]["max_steps"] == STEPS
    assert state["lora"] is None


def test_validation_logs_the_loss_and_coco_metrics_of_the_predict_path_at_its_steps(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    history = finished_run[1].history
    validated = {int(r["step"]): r for r in history if "val/loss" in r}
    assert sorted(validated) == [6, 12]
    for record in validated.values():
        assert {"val/bbox_AP", "val/bbox_AP50", "val/segm_AP", "val/segm_AR100"} <= set(record)
        assert all(-1.0 <= record[f"val/{iou}_AP"] <= 1.0 for iou in ("bbox", "segm"))


@pytest.mark.integration
def test_with_diagnostics_on_validation_logs_them_for_training_and_validation_clips_and_best_may_follow_one(
    tiny_train_overrides: list[str], train_store: str
) -> None:
    overrides = [
        *tiny_train_overrides,
        f"output.store={train_store}",
        "train.max_steps=2",
        "train.val_every=2",
        "train.val_max_frames=0",
        "train.diagnostics=true",
        "train.best_metric=diag/val_top_box_iou",
    ]
    result = train(config(overrides))
    record = next(r for r in result.history if "diag/val_top_box_iou" in r)
    names = ("top_box_iou", "matched_box_iou", "matched_is_top", "query_cosine")
    assert {f"diag/{split}_{name}" for split in ("train", "val") for name in names} <= set(record)
    assert (result.best_metric, result.best_value) == ("diag/val_top_box_iou", record["diag/val_top_box_iou"])


def test_best_checkpoint_holds_the_exported_weights_of_the_step_with_the_best_validation_metric(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    result = finished_run[1]
    scores = {int(r["step"]): r["val/segm_AP"] for r in result.history if "val/segm_AP" in r}
    best_step = max(sorted(scores), key=lambda step: scores[step])  # ties keep the earlier step
    best = load_checkpoint(result.best_checkpoint_uri)
    assert (result.best_metric, result.best_step, result.best_value) == ("val/segm_AP", best_step, scores[best_step])
    assert best["step"] == best_step and best["best"]["value"] == scores[best_step]
    assert best["metrics"]["val/segm_AP"] == scores[best_step]
    assert "optimizer" not in best
    step_weights = load_checkpoint(storage.join(result.run_uri, "checkpoints", f"step_{best_step:07d}.pt"))["model"]
    assert all(torch.equal(best["model"][k], step_weights[k]) for k in step_weights)


def test_rerunning_the_same_command_resumes_and_does_no_extra_step(finished_run: tuple[list[str], TrainResult]) -> None:
    overrides, first = finished_run
    last_before = sha256_of(first.last_checkpoint_uri)
    logged: list[int] = []
    saved: list[str] = []
    again = train(
        config(overrides),
        on_metrics=lambda step, _: logged.append(step),
        on_checkpoint=lambda kind, _: saved.append(kind),
    )
    assert again.run_uri == first.run_uri
    assert again.steps == STEPS
    assert (logged, saved) == ([], [])
    assert sha256_of(first.last_checkpoint_uri) == last_before


def test_a_run_with_another_max_steps_gets_its_own_folder(finished_run: tuple[list[str], TrainResult]) -> None:
    overrides, first = finished_run
    assert run_uri_for(config([*overrides, f"train.max_steps={STEPS + 1}"])) != first.run_uri


def test_tracking_settings_do_not_change_the_run_folder(finished_run: tuple[list[str], TrainResult]) -> None:
    overrides, first = finished_run
    assert (
        run_uri_for(config([*overrides, "mlflow.experiment_name=elsewhere", "mlflow.enabled=false"])) == first.run_uri
    )


def test_a_named_run_with_another_config_is_refused_naming_the_keys_that_differ(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    overrides, first = finished_run
    named = [*overrides, f"output.run_name={Path(first.run_uri).name}"]
    last_before = sha256_of(first.last_checkpoint_uri)
    with pytest.raises(ConfigError) as raised:
        train(config([*named, "optim.lr=0.001", "train.max_steps=20"]))
    message = str(raised.value)
    assert "optim.lr: 0.0005 -> 0.001" in message and "train.max_steps: 12 -> 20" in message
    assert first.run_uri in message and "\n" not in message
    assert sha256_of(first.last_checkpoint_uri) == last_before


def test_a_named_run_resumes_when_only_keys_that_shape_nothing_differ(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    overrides, first = finished_run
    again = train(
        config(
            [
                *overrides,
                f"output.run_name={Path(first.run_uri).name}",
                "train.log_every=3",
                "train.checkpoint_every=5",
                "data.num_workers=0",
                "train.num_threads=1",
            ]
        )
    )
    assert (again.run_uri, again.steps) == (first.run_uri, STEPS)


def test_the_best_checkpoint_loads_into_a_plain_model_as_predict_loads_it(
    finished_run: tuple[list[str], TrainResult],
) -> None:
    overrides, result = finished_run
    model = VideoClipDetector(build_detector(config(overrides).model))
    report = load_model_weights(model, result.best_checkpoint_uri)
    assert (report.missing, report.unexpected) == ([], [])


def test_model_uri_may_name_a_registered_model(finished_run: tuple[list[str], TrainResult], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from sam3_core.mlflow_records.registry import register_checkpoint
    from sam3_core.mlflow_records.settings import tracking_uri

    overrides, first = finished_run
    client = MlflowClient(tracking_uri())
    run = client.create_run(client.create_experiment(f"registry-{tmp_path.name}"))
    register_checkpoint(client, "tiny-registered", "candidate", first.best_checkpoint_uri, run.info.run_id, "p1")
    trainer = build_trainer(
        config([*overrides, f"output.store={tmp_path}", "model.uri=models:/tiny-registered@candidate"])
    )
    best = load_checkpoint(first.best_checkpoint_uri)["model"]
    assert all(torch.equal(value, best[key]) for key, value in trainer.module.state_dict().items())


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "list"], ids=["empty", "text", "list"])
@pytest.mark.integration
def test_a_model_uri_that_is_no_checkpoint_exits_2_with_one_line_naming_it(
    tiny_train_overrides: list[str],
    tmp_path: Path,
    content: bytes | str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "weights.pt"
    if content == "list":
        torch.save([torch.zeros(2)], bad)
    else:
        bad.write_bytes(content)  # type: ignore[arg-type]
    code = main([*tiny_train_overrides, f"output.store={tmp_path}", f"model.uri={bad}", *NO_TRACKING])
    assert code == 2 and capsys.readouterr().out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(bad) in errors[0] and "\n" not in errors[0]
    assert "mmap" not in errors[0] and "Traceback" not in errors[0]


@pytest.mark.integration
def test_a_lora_run_checkpoints_its_adapters_and_exports_merged_weights_in_the_official_layout(
    tiny_train_overrides: list[str], train_store: str
) -> None:
    overrides = [
        *tiny_train_overrides,
        f"output.store={train_store}",
        "train.max_steps=2",
        "train.val_max_frames=1",
        "model.lora.rank=4",
        *NO_TRACKING,
    ]
    result = train(config(overrides))
    last = load_checkpoint(result.last_checkpoint_uri)
    adapters = [key for key in last["model"] if ".lora_A." in key or ".lora_B." in key]
    assert last["lora"]["rank"] == 4 and adapters
    assert len(last["optimizer"]["state"]) == len(adapters)
    plain = VideoClipDetector(build_detector(config(overrides).model)).state_dict()
    assert set(load_checkpoint(result.best_checkpoint_uri)["model"]) == set(plain)
    sizes = next(record for record in result.history if "model/trainable_params" in record)
    assert 0 < sizes["model/trainable_params"] < sizes["model/total_params"] / 10
    assert sizes["model/optimizer_state_mb"] > 0


def kill_when_exists(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL `proc` as soon as `path` exists; give up when it exits or the timeout passes."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if path.exists():
            proc.kill()
            return
        time.sleep(0.05)


@pytest.mark.integration
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(
    tiny_train_overrides: list[str], train_store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # dropout on: resuming must also restore the random stream, not only weights and data position
    common = [
        *tiny_train_overrides,
        f"output.store={train_store}",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "model.dropout=0.1",
        *NO_TRACKING,
    ]
    interrupted = [*common, "output.run_name=interrupted"]
    last = Path(train_store) / "runs" / "interrupted" / "checkpoints" / "last.pt"
    log = tmp_path / "interrupted.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(train_command(interrupted), cwd=REPO, env=single_thread_env(), stdout=out, stderr=out)
        killer = threading.Thread(target=kill_when_exists, args=(last, proc), daemon=True)
        killer.start()
        # the reference run trains here while the subprocess starts up
        uninterrupted = execute([*common, "output.run_name=uninterrupted"])
        killer.join()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}; log ends:\n{log.read_text()[-3000:]}"
    killed_at = load_checkpoint(str(last))["step"]
    assert killed_at < 6, "the run finished before it could be killed"
    # what a kill in the middle of a checkpoint write leaves: the store's hidden temp file and the staged file
    store_leftover = last.parent / ".last.pt.k1ll3d.sam3pipe-tmp"
    store_leftover.write_bytes(b"partial")
    staged_leftover = staging_dir(str(last.parent)) / "last.pt.partial"
    staged_leftover.parent.mkdir(parents=True, exist_ok=True)
    staged_leftover.write_bytes(b"partial")

    # the same command again (in this process: a second interpreter start would double the test's time)
    with caplog.at_level(logging.INFO, logger="sam3_core.train.hooks"):
        outputs = execute(interrupted)
    assert outputs["last_checkpoint_uri"] == str(last)
    assert f"resumed {last} at step {killed_at}" in caplog.text
    assert not store_leftover.exists() and not staged_leftover.exists()

    resumed_state = load_checkpoint(outputs["last_checkpoint_uri"])
    straight_state = load_checkpoint(uninterrupted["last_checkpoint_uri"])
    assert resumed_state["step"] == straight_state["step"] == 6
    different = [k for k, v in straight_state["model"].items() if not torch.equal(v, resumed_state["model"][k])]
    assert different == []


RESUME_EVERY_STEPS = 8


@pytest.mark.integration
def test_resuming_from_every_checkpoint_in_a_fresh_process_ends_with_the_uninterrupted_weights(
    tiny_train_overrides: list[str], train_store: str
) -> None:
    """The uninterrupted run trains in this process; the resumed runs in a new one, as a restart does.

    A new process starts with fresh lazily-initialised state (TorchScript's executor among it: see
    test_trainer_loop.py for the scripted-loss case, which these few tiny steps do not happen to show).
    """
    common = [
        *tiny_train_overrides,
        f"output.store={train_store}",
        f"train.max_steps={RESUME_EVERY_STEPS}",
        "train.checkpoint_every=2",
        "train.val_every=4",
        "model.dropout=0.1",
        *NO_TRACKING,
    ]
    straight = execute([*common, "output.run_name=straight"])
    runs = Path(train_store) / "runs"
    resumed_runs = []
    for stop in range(2, RESUME_EVERY_STEPS, 2):
        folder = runs / f"from-{stop}"
        (folder / "checkpoints").mkdir(parents=True)
        shutil.copy(runs / "straight" / "checkpoints" / f"step_{stop:07d}.pt", folder / "checkpoints" / "last.pt")
        shutil.copy(runs / "straight" / "config.yaml", folder / "config.yaml")
        resumed_runs.append([*common, f"output.run_name=from-{stop}"])
    script = "import json, sys\nfrom components.train import execute\nfor a in sys.argv[1:]: execute(json.loads(a))"
    proc = subprocess.run(
        [sys.executable, "-c", script, *(json.dumps(r) for r in resumed_runs)],
        check=False,
        cwd=REPO,
        env=single_thread_env(),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_checkpoint(straight["last_checkpoint_uri"])
    for stop in range(2, RESUME_EVERY_STEPS, 2):
        resumed = load_checkpoint(str(runs / f"from-{stop}" / "checkpoints" / "last.pt"))
        assert resumed["step"] == RESUME_EVERY_STEPS
        different = [k for k, v in expected["model"].items() if not torch.equal(v, resumed["model"][k])]
        assert different == [], f"resumed from step {stop}"
        assert _without_speed(resumed["history"]) == _without_speed(expected["history"])


def _without_speed(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in history]


def test_trains_with_the_dataset_and_the_outputs_on_s3(
    s3_bucket: str, torch_single_thread: None, tmp_path: Path
) -> None:
    store = f"{s3_bucket}/store"
    dataset = prepare_dataset(DataPrepConfig(source="synthetic", synthetic=TINY_VIDEOS, store=store, val_fraction=0.25))
    cache = tmp_path / "cache"
    overrides = [
        f"data.uri={dataset.uri}",
        f"data.cache_dir={cache}",
        *TINY_MODEL,
        *TINY_TRAIN,
        f"output.store={store}",
        "train.max_steps=2",
    ]
    result = train(config(overrides))
    assert result.run_uri.startswith(f"{store}/runs/")
    assert {"config.yaml", "checkpoints/last.pt", "checkpoints/best.pt"} <= set(storage.list_files(result.run_uri))
    assert load_checkpoint(result.last_checkpoint_uri)["step"] == 2
    cached_frames = list(cache.rglob("*.png"))
    assert cached_frames, "frames were not read through the local cache"


def test_a_dataset_uri_with_no_published_dataset_is_an_input_error(
    tiny_train_overrides: list[str], tmp_path: Path
) -> None:
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"manifest\.json") as raised:
        build_trainer(config([*tiny_train_overrides, f"data.uri={nowhere}", f"output.store={tmp_path}"]))
    assert raised.value.source == nowhere


@pytest.mark.integration
def test_a_missing_data_uri_exits_2_with_a_one_line_error(tmp_path: Path) -> None:
    env = single_thread_env({k: v for k, v in os.environ.items() if k != "SAM3PIPE_STORE"})
    proc = subprocess.run(
        train_command([]),
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "missing mandatory value: uri" in errors[0], proc.stderr


def test_an_unknown_override_exits_2_with_a_one_line_error_naming_it(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data.uri=anywhere", "train.max_stepz=3"]) == 2
    assert capsys.readouterr().out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "train.max_stepz" in errors[0] and "\n" not in errors[0]


@pytest.mark.integration
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "boxes-only"])
def test_every_trainable_parameter_gets_a_gradient_in_a_step_so_ddp_need_not_search_for_unused_ones(
    tiny_train_overrides: list[str], train_store: str, with_masks: bool
) -> None:
    trainer = build_trainer(
        config(
            [
                *tiny_train_overrides,
                f"output.store={train_store}",
                f"data.clips.with_masks={str(with_masks).lower()}",
                "train.val_every=0",
                "train.best_metric=train/loss",
                "train.best_mode=min",
            ]
        )
    )
    names = {param: name for name, param in trainer.module.detector.named_parameters()}
    trainable = [param for param in trainer.module.parameters() if param.requires_grad]
    for _ in range(3):
        trainer.task.losses(trainer.model, trainer.task.to_device(next(trainer.data)))["loss"].backward()
        assert [names[p] for p in trainable if p.grad is None] == []
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.data.close()


@pytest.mark.integration
def test_the_parameters_frozen_as_unreached_get_no_gradient_when_trained(
    tiny_train_overrides: list[str], train_store: str
) -> None:
    # if sam3 starts reaching one of them, UNREACHED must lose it (else it is never trained)
    trainer = build_trainer(
        config(
            [*tiny_train_overrides, f"output.store={train_store}", "train.val_every=0", "train.best_metric=train/loss"]
        )
    )
    detector = trainer.module.detector
    unreached = {n: p for n, p in detector.named_parameters() if any(n.startswith(u) for u in UNREACHED)}
    assert [u for u in UNREACHED if not any(n.startswith(u) for n in unreached)] == []
    for param in unreached.values():
        param.requires_grad_(True)
    trainer.task.losses(trainer.model, trainer.task.to_device(next(trainer.data)))["loss"].backward()
    assert [n for n, p in unreached.items() if p.grad is not None] == []
    trainer.data.close()
