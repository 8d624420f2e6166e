"""Every value of the train config is checked when it is built: a one-line ConfigError naming the key.

Through Hydra (as the CLI composes it) and through the CLI itself (exit 2, one line, no traceback).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from components.train import component_name, main
from sam3_core import comm
from sam3_core.config import load_config
from sam3_core.errors import ConfigError
from sam3_core.model.config import LoraConfig, ModelConfig
from sam3_core.train.config import DataConfig, LoopConfig, TrainConfig
from sam3_core.train.run import config_differences, run_name_for

BAD_OVERRIDES = [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.schedule=step", "optim.schedule"),
    ("loss.loss_bbox=-1", "loss.loss_bbox"),
    ("loss.focal_alpha=1.5", "loss.focal_alpha"),
    ("loss.o2m_topk=0", "loss.o2m_topk"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.batch_size=-2", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("model.image_size=0", "model.image_size"),
    ("model.image_size=100", "model.image_size"),
    ("model.image_size=100000", "model.image_size"),
    ("model.patch_size=0", "model.patch_size"),
    ("model.d_model=60", "model.d_model"),
    ("model.num_queries=0", "model.num_queries"),
    ("model.dropout=1", "model.dropout"),
    ("model.vit_global_att_blocks=[0]", "model.vit_global_att_blocks"),
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.targets=[out_proj]", "model.lora.targets"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.log_every=0", "train.log_every"),
    ("train.val_every=-1", "train.val_every"),
    ("train.amp=fp8", "train.amp"),
    ("train.best_mode=median", "train.best_mode"),
    ("train.best_metric=accuracy", "train.best_metric"),
    ("train.best_metric=val/segm_mAP", "train.best_metric"),
    ("train.val_every=0", "train.best_metric"),
    ("train.val_max_frames=0", "train.best_metric"),
    ("output.run_name=../elsewhere", "output.run_name"),
    ("train.stage=both", "train.stage"),
    ("tracker_train.trainable=everything", "tracker_train.trainable"),
    ("tracker_train.loss.loss_mask=-1", "tracker_train.loss.loss_mask"),
    ("data.tracker_clips.max_objects=0", "data.tracker_clips.max_objects"),
    ("data.tracker_clips.max_correct_frames=1", "data.tracker_clips.max_correct_frames"),
    ("data.tracker_clips.point_prob=2", "data.tracker_clips.point_prob"),
]


def config(overrides: list[str]) -> TrainConfig:
    return load_config("train", TrainConfig, ["data.uri=anywhere", *overrides])


@pytest.mark.parametrize(("override", "key"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_a_bad_value_is_a_one_line_config_error_naming_its_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config([override])
    message = str(raised.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize(("override", "key"), BAD_OVERRIDES[:4], ids=[o for o, _ in BAD_OVERRIDES[:4]])
def test_the_cli_exits_2_with_one_line_for_a_bad_value(
    override: str, key: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data.uri=anywhere", override]) == 2
    assert capsys.readouterr().out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and key in errors[0] and "Traceback" not in errors[0]


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: ModelConfig(uri=["a", "b"]), "model.uri"),  # type: ignore[arg-type]
        (lambda: ModelConfig(image_size="112"), "model.image_size"),  # type: ignore[arg-type]
        (lambda: DataConfig(uri=3), "data.uri"),  # type: ignore[arg-type]
        (lambda: LoopConfig(resume="yes"), "train.resume"),  # type: ignore[arg-type]
        (lambda: LoraConfig(modules="transformer"), "model.lora.modules"),  # type: ignore[arg-type]
    ],
    ids=["uri-list", "size-string", "data-uri-int", "resume-string", "modules-string"],
)
def test_values_of_the_wrong_type_are_refused_when_built_from_python(build: Callable[[], object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build()


def test_validation_metrics_as_best_metric_are_fine_with_validation_on() -> None:
    for metric, mode in (("val/segm_AP", "max"), ("val/bbox_AR100", "max"), ("val/loss", "min"), ("train/loss", "min")):
        assert config([f"train.best_metric={metric}", f"train.best_mode={mode}"]).train.best_metric == metric


def test_a_segm_metric_without_a_mask_head_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model\.enable_segmentation=false"):
        config(["model.enable_segmentation=false"])


def test_keys_that_shape_nothing_leave_the_run_name_alone() -> None:
    base = run_name_for(config([]))
    neutral = [
        "train.log_every=3",
        "train.num_threads=1",
        "mlflow.enabled=false",
        "data.num_workers=2",
        "train.checkpoint_every=7",
        "output.store=/elsewhere",
    ]
    assert run_name_for(config(neutral)) == base
    assert run_name_for(config(["optim.lr=0.001"])) != base


def test_keys_of_another_stage_leave_the_run_name_alone() -> None:
    detector = run_name_for(config([]))
    assert run_name_for(config(["data.tracker_clips.max_objects=2", "tracker_train.loss.loss_dice=2"])) == detector
    tracker = ["train.stage=tracker", "train.best_metric=val/tracker_loss", "train.best_mode=min"]
    assert run_name_for(config(tracker)) != detector
    assert run_name_for(config([*tracker, "data.clips.num_negatives=3"])) == run_name_for(config(tracker))
    assert run_name_for(config([*tracker, "data.tracker_clips.max_objects=2"])) != run_name_for(config(tracker))


@pytest.mark.parametrize("metric", ["val/segm_AP", "val/bbox_AP50", "val/loss", "diag/top_box_iou"])
def test_stage_tracker_refuses_a_detector_metric_for_the_best_checkpoint(metric: str) -> None:
    with pytest.raises(ConfigError, match="leaves the detector unchanged"):
        config(["train.stage=tracker", f"train.best_metric={metric}"])


@pytest.mark.parametrize("metric", ["val/tracker_loss", "val/vos_JF_mean"])
def test_tracker_metrics_need_a_stage_with_a_tracker(metric: str) -> None:
    with pytest.raises(ConfigError, match=r"needs train\.stage=tracker or joint"):
        config([f"train.best_metric={metric}"])


@pytest.mark.parametrize("metric", ["val/vos_J_recall", "val/vos_F_decay", "val/tracker_loss"])
def test_stage_tracker_takes_every_metric_its_validation_logs_for_the_best_checkpoint(metric: str) -> None:
    assert config(["train.stage=tracker", f"train.best_metric={metric}"]).train.best_metric == metric


def test_a_vos_metric_its_validation_does_not_log_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"val/vos_<J\|F>_<mean\|recall\|decay>"):
        config(["train.stage=tracker", "train.best_metric=val/vos_JF_recall"])


def test_a_vos_best_metric_needs_validation_videos() -> None:
    with pytest.raises(ConfigError, match=r"needs train\.val_max_videos > 0"):
        config(["train.stage=tracker", "train.best_metric=val/vos_JF_mean", "train.val_max_videos=0"])


def test_stage_tracker_refuses_detector_lora() -> None:
    with pytest.raises(ConfigError, match="keeps the detector frozen"):
        config(["train.stage=tracker", "train.best_metric=train/loss", "model.lora.rank=4"])


def test_config_differences_name_each_shaping_key_with_both_values() -> None:
    stored = {"optim.lr": 0.0005, "train.log_every": 10, "model.lora.rank": 0}
    current = {"optim.lr": 0.001, "train.log_every": 5, "model.lora.rank": 0, "train.best_metric": "val/loss"}
    assert config_differences(stored, current) == [
        "optim.lr: 0.0005 -> 0.001",
        'train.best_metric: absent -> "val/loss"',
    ]


def test_bad_launcher_variables_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two'"):
        comm.launch_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="need 0 <= RANK < WORLD_SIZE"):
        comm.launch_env()


def test_threads_default_to_the_cores_shared_by_the_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = comm.default_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * alone))
    assert (alone, comm.default_num_threads()) == (comm.available_cores(), 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert comm.default_num_threads() == 3


def test_each_stage_is_its_own_mlflow_component() -> None:
    tracker = ["train.best_metric=val/vos_JF_mean"]
    assert component_name(config([])) == "train"
    assert component_name(config(["train.stage=tracker", *tracker])) == "train_tracker"
    assert component_name(config(["train.stage=joint", *tracker])) == "train_joint"
