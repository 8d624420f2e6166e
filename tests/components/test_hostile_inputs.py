"""Hostile inputs: every bad value, file or URI given to a component is one named error and changes nothing.

A table of bad inputs across the four components (data-prep, train, predict, evaluate), each run
through the component's command line. For every case: exit status 2, exactly one error line that
names the key, file or URI at fault (and says what to do), no traceback, no JSON output, and the
store and the input files byte for byte as they were.

Most cases run in this process through the components' `main(argv)` (the CLI entry is the same
code, and a process per case would cost seconds of imports each); the `SUBPROCESS` cases run as
real `python -m components.<name>` processes to show what a user's console shows, and hold the
cases that would hang or eat memory if accepted (each under a timeout or an address-space limit).
They start before the in-process cases and are collected after them, each with a store of its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from components import data_prep, evaluate, predict, train
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.synthetic import SyntheticConfig, generate
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from tests.fixtures.datasets import TINY_MODEL, TINY_TRAIN, TINY_VIDEOS, single_thread_env
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO

# every test here starts processes, servers or trainings (the integration tier)
pytestmark = pytest.mark.integration

MAINS = {"data-prep": data_prep.main, "train": train.main, "predict": predict.main, "evaluate": evaluate.main}
MODULES = {
    "data-prep": "components.data_prep",
    "train": "components.train",
    "predict": "components.predict",
    "evaluate": "components.evaluate",
}
# What every case of a component passes besides its bad input: a valid, small, quick run.
TRAIN_BASE = [
    "data.uri={dataset}",
    *TINY_MODEL,
    *TINY_TRAIN,
    "train.max_steps=1",
    "train.num_threads=1",
    "mlflow.enabled=false",
]
PREDICT_BASE = ["model.uri={ckpt}", "data.uri={dataset}", *TINY_MODEL, "mlflow.enabled=false"]
EVALUATE_BASE = ["output={store}/evaluation/metrics.json", "mlflow.enabled=false"]
BASE = {
    "data-prep": [
        "synthetic.num_videos=2",
        "synthetic.frames_per_video=2",
        "synthetic.height=32",
        "synthetic.width=32",
        "synthetic.min_size=8",
        "synthetic.max_size=16",
        "val_fraction=0.5",
    ],
    "train": TRAIN_BASE,
    "predict": PREDICT_BASE,
    "evaluate": EVALUATE_BASE,
}
# S3 cases talk to endpoints on 127.0.0.1 only: dummy keys, and no credential look-up on the network
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "hostile",
    "AWS_SECRET_ACCESS_KEY": "hostile",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
# Generous: a process spends most of its first seconds importing torch, far longer on a busy machine.
SUBPROCESS_TIMEOUT_S = 300
# Cases that would hang if accepted get this long in their own process before they count as a hang
# (a correct answer takes the imports and a second; several times that on a loaded 2-core machine).
HANG_TIMEOUT_S = 120
# Subprocess cases running side by side (a few hundred MB each)
PROCESSES_AT_ONCE = 6
# Address-space cap for data-prep cases that would allocate gigabytes if accepted (it imports no torch).
MEMORY_LIMIT_BYTES = 3 * 1024**3


@dataclass(frozen=True)
class Case:
    """One bad input. `args` and `env` may use the placeholders of the `world` fixture ({dataset}, ...)."""

    id: str
    component: str
    args: tuple[str, ...]
    # substrings the error line must contain: the key, file or URI at fault
    names: tuple[str, ...]
    # substrings it must not contain (the confusing message a fix replaces)
    forbid: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # run as a real process (console shape, or a hang / memory blow-up if accepted)
    subprocess: bool = False
    memory_limit: bool = False
    timeout_s: int = SUBPROCESS_TIMEOUT_S
    # the component's usual valid arguments are added unless False
    base: bool = True


def case(id: str, component: str, args: str | tuple[str, ...], names: str | tuple[str, ...], **kw: Any) -> Case:
    args = (args,) if isinstance(args, str) else args
    names = (names,) if isinstance(names, str) else names
    return Case(id, component, tuple(a for a in args if a), names, **kw)


CASES = [
    # ---------------------------------------------------------------- data prep: config values
    case("dp-unknown-source", "data-prep", "source=webcam", "source"),
    case("dp-ytvis-without-annotations", "data-prep", "source=ytvis", "annotations"),
    case("dp-val-fraction-above-one", "data-prep", "val_fraction=1.5", "val_fraction", subprocess=True),
    case("dp-val-fraction-nan", "data-prep", "val_fraction=nan", "val_fraction"),
    case("dp-negative-resize", "data-prep", "resize_max_side=-1", "resize_max_side"),
    case("dp-one-video-leaves-none-for-training", "data-prep", "synthetic.num_videos=1", "synthetic.num_videos"),
    case("dp-zero-frames", "data-prep", "synthetic.frames_per_video=0", "synthetic.frames_per_video"),
    case("dp-unknown-colour", "data-prep", "synthetic.categories=[purple circle]", "synthetic.categories"),
    case(
        "dp-more-min-than-max-objects",
        "data-prep",
        ("synthetic.min_objects=3", "synthetic.max_objects=1"),
        "synthetic.max_objects",
    ),
    case("dp-count-not-a-number", "data-prep", "synthetic.num_videos=many", "synthetic.num_videos"),
    case("dp-misspelt-key", "data-prep", "synthetic.num_video=4", ("synthetic.num_video", "did you mean")),
    case("dp-unbalanced-list", "data-prep", "synthetic.categories=[red circle", ("synthetic.categories", "quote")),
    case("dp-unsupported-store-scheme", "data-prep", "store=ftp://host/store", "ftp://host/store"),
    case("dp-noise-nan", "data-prep", "synthetic.noise=nan", "synthetic.noise"),
    case("dp-speed-infinite", "data-prep", "synthetic.max_speed=inf", "synthetic.max_speed"),
    case(
        "dp-huge-frames",
        "data-prep",
        ("synthetic.height=200000", "synthetic.width=200000"),
        "synthetic.height",
        subprocess=True,
        memory_limit=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    case(
        "dp-huge-video-count",
        "data-prep",
        "synthetic.num_videos=1000000000",
        "synthetic.num_videos",
        subprocess=True,
        memory_limit=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    case(
        "dp-huge-resize",
        "data-prep",
        "resize_max_side=100000000",
        "resize_max_side",
        subprocess=True,
        memory_limit=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    # ---------------------------------------------------------------- data prep: input files and stores
    case(
        "dp-annotations-missing",
        "data-prep",
        ("source=ytvis", "annotations={files}/nope.json", "frames_root={ytvis}"),
        "nope.json",
    ),
    case(
        "dp-annotations-malformed-json",
        "data-prep",
        ("source=ytvis", "annotations={files}/broken.json", "frames_root={ytvis}"),
        "broken.json",
    ),
    case(
        "dp-annotations-a-list",
        "data-prep",
        ("source=ytvis", "annotations={files}/list.json", "frames_root={ytvis}"),
        "list.json",
    ),
    case(
        "dp-frame-file-missing",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/missing_frame.json", "frames_root={ytvis}"),
        ("missing_frame.json", "file_names[0]"),
    ),
    case(
        "dp-length-disagrees-with-frames",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/wrong_length.json", "frames_root={ytvis}"),
        ("wrong_length.json", "length"),
    ),
    case(
        "dp-unknown-category-id",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/unknown_category.json", "frames_root={ytvis}"),
        "category_id",
    ),
    case(
        "dp-absolute-frame-path",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/absolute_path.json", "frames_root={ytvis}"),
        "file_names[0]",
    ),
    case(
        "dp-path-with-space-and-accent",
        "data-prep",
        ("source=ytvis", "annotations={files}/vidéos à moi/annotations.json", "frames_root={ytvis}"),
        "vidéos à moi/annotations.json",
    ),
    case(
        "dp-truncated-jpeg",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/truncated.json", "frames_root={ytvis}"),
        ("truncated.json", "file_names[0]"),
    ),
    case(
        "dp-no-categories",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/no_categories.json", "frames_root={ytvis}"),
        ("no_categories.json", "categories"),
    ),
    case(
        "dp-polygon-outside-the-frame",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/polygon_outside.json", "frames_root={ytvis}"),
        "segmentations[0]",
        forbid=("bboxes[0]",),
    ),
    case(
        "dp-store-is-a-file",
        "data-prep",
        "store={files}/plain.txt",
        ("plain.txt", "not a folder"),
    ),
    case(
        "dp-endpoint-not-a-url",
        "data-prep",
        "store=s3://bucket/store",
        "AWS_ENDPOINT_URL",
        env={"AWS_ENDPOINT_URL": "not a url"},
    ),
    case(
        "dp-object-store-refuses-connections",
        "data-prep",
        "store=s3://bucket/store",
        "127.0.0.1:{closed}",
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}", "SAM3PIPE_S3_MAX_ATTEMPTS": "2"},
    ),
    # ---------------------------------------------------------------- train: config values
    case("tr-no-dataset", "train", "data.uri=???", "data.uri"),
    case("tr-not-a-dataset", "train", "data.uri={files}", "manifest.json"),
    case("tr-unsupported-dataset-scheme", "train", "data.uri=http://example.com/ds", "http://example.com/ds"),
    case("tr-zero-steps", "train", "train.max_steps=0", "train.max_steps"),
    case("tr-unknown-amp", "train", "train.amp=fp8", "train.amp", subprocess=True),
    case("tr-unknown-schedule", "train", "optim.schedule=exp", "optim.schedule"),
    case("tr-unknown-frame-reduction", "train", "loss.frame_reduction=median", "loss.frame_reduction"),
    case("tr-zero-frames-per-clip", "train", "data.clips.frames_per_clip=0", "frames_per_clip"),
    case("tr-stride-min-above-max", "train", ("data.clips.stride_min=3", "data.clips.stride_max=1"), "stride"),
    case("tr-unknown-preset", "train", "model=huge", ("model/huge", "tiny")),
    case("tr-unsafe-pipeline-run-id", "train", "mlflow.pipeline_run_id='a/b'", "mlflow.pipeline_run_id"),
    case("tr-steps-not-an-integer", "train", "train.max_steps=1.5", "train.max_steps"),
    case("tr-misspelt-key", "train", "optim.weight_decy=0.1", ("optim.weight_decy", "optim.weight_decay")),
    case("tr-lr-negative", "train", "optim.lr=-1", "optim.lr"),
    case("tr-lr-nan", "train", "optim.lr=nan", "optim.lr"),
    case("tr-batch-size-zero", "train", "data.batch_size=0", "data.batch_size"),
    case("tr-batch-size-negative", "train", "data.batch_size=-2", "data.batch_size"),
    case("tr-workers-negative", "train", "data.num_workers=-1", "data.num_workers"),
    case("tr-image-size-zero", "train", "model.image_size=0", "model.image_size"),
    case(
        "tr-image-size-not-a-patch-multiple",
        "train",
        ("model.image_size=57", "model.vit_pretrain_img_size=57"),
        "model.image_size",
    ),
    case("tr-warmup-negative", "train", "optim.warmup_steps=-1", "optim.warmup_steps"),
    case("tr-beta-above-one", "train", "optim.betas=[1.5,0.999]", "optim.betas"),
    case("tr-threads-negative", "train", "train.num_threads=-1", "train.num_threads"),
    case("tr-grad-clip-negative", "train", "optim.grad_clip=-1", "optim.grad_clip"),
    case("tr-loss-weight-nan", "train", "loss.loss_ce=nan", "loss.loss_ce"),
    case("tr-zero-queries", "train", "model.num_queries=0", "model.num_queries"),
    case(
        "tr-clip-longer-than-every-video",
        "train",
        "data.clips.frames_per_clip=50",
        "data.clips.frames_per_clip",
        subprocess=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    # ---------------------------------------------------------------- train: checkpoints and runs
    case("tr-checkpoint-missing", "train", "model.uri={files}/missing.pt", "missing.pt"),
    case("tr-checkpoint-path-with-accent", "train", "model.uri={files}/modèle final.pt", "modèle final.pt"),
    case("tr-checkpoint-empty", "train", "model.uri={files}/empty.pt", "empty.pt", forbid=("mmap",)),
    case("tr-checkpoint-not-torch", "train", "model.uri={files}/text.pt", "text.pt", forbid=("mmap",)),
    case("tr-checkpoint-holds-a-list", "train", "model.uri={files}/list.pt", "list.pt"),
    case(
        "tr-registry-uri-not-resolved",
        "train",
        "model.uri=models:/sam3-video@candidate",
        "models:/sam3-video@candidate",
        forbid=("no such file",),
    ),
    case(
        "tr-existing-run-with-another-config",
        "train",
        ("output.run_name=existing", "optim.lr=0.001"),
        ("existing", "optim.lr"),
    ),
    # ---------------------------------------------------------------- predict
    case("pr-no-checkpoint", "predict", "model.uri=null", "model.uri"),
    case(
        "pr-nms-iou-negative",
        "predict",
        "detection.nms_iou_threshold=-1",
        "detection.nms_iou_threshold",
        subprocess=True,
    ),
    case("pr-nms-iou-above-one", "predict", "detection.nms_iou_threshold=1.5", "detection.nms_iou_threshold"),
    case("pr-nms-probability-nan", "predict", "detection.nms_prob_threshold=nan", "detection.nms_prob_threshold"),
    case("pr-nms-not-a-bool", "predict", "detection.nms=maybe", "detection.nms"),
    case("pr-top-k-zero", "predict", "postprocess.top_k=0", "postprocess.top_k"),
    case("pr-mask-threshold-one", "predict", "postprocess.mask_threshold=1", "postprocess.mask_threshold"),
    case("pr-unknown-matcher", "predict", "association.matcher=magic", "association.matcher"),
    case("pr-association-iou-nan", "predict", "association.iou_threshold=nan", "association.iou_threshold"),
    case("pr-missed-frames-negative", "predict", "association.max_missed_frames=-1", "association.max_missed_frames"),
    case("pr-filesystem-gather-without-folder", "predict", "dumper.gather=filesystem", "dumper.shared_dir"),
    case("pr-dumper-timeout-zero", "predict", "dumper.timeout_s=0", "dumper.timeout_s"),
    case("pr-preview-score-above-one", "predict", "preview.min_score=1.5", "preview.min_score"),
    case("pr-unknown-split", "predict", "data.split=test", "data.split"),
    case("pr-not-a-dataset", "predict", "data.uri={files}", "manifest.json"),
    case("pr-output-unsupported-scheme", "predict", "output.uri=gs://bucket/predictions", "output.uri"),
    case("pr-checkpoint-missing", "predict", "model.uri={files}/missing.pt", "missing.pt"),
    case("pr-checkpoint-path-with-quote", "predict", "model.uri={files}/it's mine.pt", "it's mine.pt"),
    case("pr-checkpoint-of-another-architecture", "predict", "model.d_model=32", ("model.pt", "preset")),
    case("pr-malformed-registry-uri", "predict", "model.uri=models:/", ("models:/", "model.uri")),
    case(
        "pr-replacing-predictions-of-other-settings",
        "predict",
        ("output.uri={preds}", "postprocess.top_k=3"),
        ("postprocess.top_k", "output.overwrite=true"),
    ),
    case("pr-checkpoint-empty", "predict", "model.uri={files}/empty.pt", "empty.pt", forbid=("mmap",)),
    case("pr-checkpoint-holds-a-list", "predict", "model.uri={files}/list.pt", "list.pt"),
    case(
        "pr-registry-unreachable",
        "predict",
        ("model.uri=models:/sam3-video@candidate", "mlflow.enabled=true"),
        "models:/sam3-video@candidate",
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}"},
        subprocess=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    case(
        "pr-through-the-sam3pipe-cli",
        "predict",
        ("component", "predict", *PREDICT_BASE, "postprocess.top_k=-3"),
        "postprocess.top_k",
        subprocess=True,
        base=False,
    ),
    # ---------------------------------------------------------------- evaluate
    case("ev-nothing-given", "evaluate", "", "gt"),
    case(
        "ev-gt-missing",
        "evaluate",
        ("--gt", "{files}/nope.json", "--predictions", "{preds}"),
        "nope.json",
        subprocess=True,
    ),
    case("ev-flag-without-its-value", "evaluate", "--gt", "--gt"),
    case(
        "ev-gt-malformed-json", "evaluate", ("--gt", "{files}/broken.json", "--predictions", "{preds}"), "broken.json"
    ),
    case("ev-gt-a-list", "evaluate", ("--gt", "{files}/list.json", "--predictions", "{preds}"), "list.json"),
    case("ev-unknown-backend", "evaluate", ("--gt", "{gt}", "--predictions", "{preds}", "backend=fast"), "backend"),
    case("ev-unknown-kind", "evaluate", ("--gt", "{gt}", "--predictions", "{preds}", "kind=image"), "kind"),
    case("ev-kind-disagrees-with-gt", "evaluate", ("--gt", "{gt}", "--predictions", "{preds}", "kind=coco"), "kind"),
    case(
        "ev-unknown-iou-type",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "iou_types=[keypoints]"),
        "iou_types",
    ),
    case(
        "ev-max-dets-not-increasing",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "max_dets=[0,10,1]"),
        "max_dets",
    ),
    case(
        "ev-output-is-a-folder",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={store}/evaluation/"),
        "output",
    ),
    case(
        "ev-output-collides-with-the-table",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={store}/evaluation/per_category.csv"),
        "output",
    ),
    case(
        "ev-predictions-missing",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{files}/no-predictions/"),
        "no-predictions",
    ),
    case("ev-predictions-not-a-list", "evaluate", ("--gt", "{gt}", "--predictions", "{files}/dict.json"), "dict.json"),
    case(
        "ev-nan-frame-scores",
        "evaluate",
        ("--gt", "{frames_gt}", "--predictions", "{files}/nan_bbox.json", "iou_types=[bbox]"),
        ("nan_bbox.json", "score"),
    ),
    case(
        "ev-nan-video-scores",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{files}/nan_video.json"),
        ("nan_video.json", "score"),
    ),
    case(
        "ev-truncated-rle",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{files}/truncated_rle.json"),
        ("truncated_rle.json", "counts"),
        subprocess=True,
        timeout_s=HANG_TIMEOUT_S,
    ),
    case(
        "ev-unknown-image-id",
        "evaluate",
        ("--gt", "{frames_gt}", "--predictions", "{files}/unknown_image.json", "iou_types=[bbox]"),
        "image_id",
    ),
]


# ---------------------------------------------------------------------------- the world the cases run in


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _ytvis_variants(root: Path) -> None:
    """A valid small YTVIS set under `root` (the frames root) and one broken annotation file per flaw."""
    annotations = json.loads(
        generate(
            SyntheticConfig(num_videos=2, frames_per_video=2, height=32, width=32, min_size=8, max_size=16), root
        ).read_text()
    )

    def variant(name: str, change: Any) -> None:
        data = json.loads(json.dumps(annotations))
        change(data)
        _write_json(root / f"{name}.json", data)

    first = annotations["videos"][0]["file_names"][0]
    with Image.open(root / first) as image:
        image.convert("RGB").save(root / "frames" / "whole.jpg", format="JPEG", quality=95)
    jpeg = (root / "frames" / "whole.jpg").read_bytes()
    (root / "frames" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    variant("missing_frame", lambda d: d["videos"][0]["file_names"].__setitem__(0, "frames/nope.png"))
    variant("wrong_length", lambda d: d["videos"][0].__setitem__("length", 7))
    variant("unknown_category", lambda d: d["annotations"][0].__setitem__("category_id", 99))
    variant("absolute_path", lambda d: d["videos"][0]["file_names"].__setitem__(0, "/etc/hostname"))
    variant("truncated", lambda d: d["videos"][0]["file_names"].__setitem__(0, "frames/truncated.jpg"))
    variant("no_categories", lambda d: (d.__setitem__("categories", []), d.__setitem__("annotations", [])))

    def polygon_outside(d: dict) -> None:
        track = d["annotations"][0]
        frame = next(t for t, box in enumerate(track["bboxes"]) if box is not None)
        for t in range(len(track["bboxes"])):
            if t != frame:
                track["bboxes"][t] = track["segmentations"][t] = track["areas"][t] = None
        if frame != 0:
            track["bboxes"][0], track["bboxes"][frame] = track["bboxes"][frame], None
            track["areas"][0], track["areas"][frame] = track["areas"][frame], None
            track["segmentations"][frame] = None
        track["segmentations"][0] = [[100.0, 100.0, 140.0, 100.0, 140.0, 140.0]]

    variant("polygon_outside", polygon_outside)


def _broken_predictions(preds: Path, files: Path) -> None:
    """Prediction files with one flaw each, made from real predictions."""
    bbox = json.loads((preds / PREDICTION_FILES["bbox"]).read_text())
    video = json.loads((preds / PREDICTION_FILES["video"]).read_text())
    nan_bbox = [dict(r) for r in bbox]
    nan_bbox[0]["score"] = math.nan
    (files / "nan_bbox.json").write_text(json.dumps(nan_bbox))
    nan_video = [dict(r) for r in video]
    nan_video[0]["score"] = math.nan
    (files / "nan_video.json").write_text(json.dumps(nan_video))
    truncated = json.loads(json.dumps(video))
    segmentation = next(s for s in truncated[0]["segmentations"] if s is not None)
    segmentation["counts"] = segmentation["counts"][: max(1, len(segmentation["counts"]) // 2)]
    (files / "truncated_rle.json").write_text(json.dumps(truncated))
    unknown = [dict(r) for r in bbox]
    unknown[0]["image_id"] = 99999
    (files / "unknown_image.json").write_text(json.dumps(unknown))
    _write_json(files / "dict.json", {"predictions": bbox[:1]})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None) -> dict[str, str]:
    """A store holding a dataset, a finished training run and predictions; a folder of bad input files.

    Returns the placeholders of the cases: {store}, {dataset}, {ckpt}, {preds}, {gt}, {frames_gt},
    {files}, {ytvis}, {closed}, {mlflow_db}.
    """
    root = tmp_path_factory.mktemp("hostile")
    store, files = root / "store", root / "files"
    files.mkdir()
    env = {
        "SAM3PIPE_STORE": str(store),
        "SAM3PIPE_CACHE": str(root / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        **FAKE_AWS,
    }
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        dataset = prepare_dataset(
            DataPrepConfig(source="synthetic", synthetic=TINY_VIDEOS, store=str(store), val_fraction=0.25)
        )
        model = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56)))
        save_checkpoint({"model": model.state_dict()}, str(files / "model.pt"), step=0)
        (files / "empty.pt").write_bytes(b"")
        (files / "text.pt").write_text("these are not weights\n")
        torch.save([1, 2, 3], files / "list.pt")
        (files / "broken.json").write_text('{"videos": [')
        (files / "list.json").write_text("[1, 2]")
        (files / "plain.txt").write_text("a file where a folder should be\n")
        _ytvis_variants(files / "ytvis")
        preds = store / "predictions" / "existing"
        assert (
            predict.main(
                [
                    f"model.uri={files / 'model.pt'}",
                    f"data.uri={dataset.uri}",
                    *TINY_MODEL,
                    f"output.uri={preds}",
                    "postprocess.top_k=5",
                    "mlflow.enabled=false",
                ]
            )
            == 0
        )
        _broken_predictions(preds, files)
        assert (
            train.main(
                [
                    f"data.uri={dataset.uri}",
                    *TINY_MODEL,
                    *TINY_TRAIN,
                    "train.max_steps=2",
                    "train.checkpoint_every=2",
                    "train.num_threads=1",
                    "output.run_name=existing",
                    "mlflow.enabled=false",
                ]
            )
            == 0
        )
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return {
        "root": str(root),
        "store": str(store),
        "dataset": dataset.uri,
        "ckpt": str(files / "model.pt"),
        "preds": str(preds),
        "gt": f"{dataset.uri}/val.json",
        "frames_gt": f"{dataset.uri}/val_frames_coco.json",
        "files": str(files),
        "ytvis": str(files / "ytvis"),
        "closed": str(free_port()),
        **env,
    }


def _fill(text: str, world: dict[str, str]) -> str:
    for name, value in world.items():
        text = text.replace("{" + name + "}", value)
    return text


def argv_of(c: Case, world: dict[str, str]) -> list[str]:
    base = BASE[c.component] if c.base else []
    return [_fill(a, world) for a in [*base, *c.args]]


def env_of(c: Case, world: dict[str, str]) -> dict[str, str]:
    names = ("SAM3PIPE_STORE", "SAM3PIPE_CACHE", "MLFLOW_TRACKING_URI", *FAKE_AWS)
    return {**{n: world[n] for n in names}, **{k: _fill(v, world) for k, v in c.env.items()}}


def snapshot(world: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """Size, modification time and inode of every file in the store and among the input files.

    Any write, replace or removal changes one of them; hashing the store's checkpoints for each of
    a hundred cases would cost more than the cases themselves.
    """
    out = {}
    for top in (world["store"], world["files"]):
        for path in sorted(Path(top).rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return out


# ---------------------------------------------------------------------------- checks


@dataclass
class Outcome:
    status: int | None
    error_lines: list[str]
    stdout: str
    console: str
    note: str = ""


def check(c: Case, outcome: Outcome, world: dict[str, str]) -> None:
    """Exit 2, one error line naming the culprit, no traceback, no outputs."""
    assert outcome.status == 2, f"exit status {outcome.status} {outcome.note}\n{outcome.console[-3000:]}"
    assert "Traceback" not in outcome.console, outcome.console[-3000:]
    assert len(outcome.error_lines) == 1, outcome.error_lines
    line = outcome.error_lines[0]
    assert "error:" in line and "\n" not in line
    for name in c.names:
        assert _fill(name, world) in line, f"{name!r} not named in: {line}"
    for text in c.forbid:
        assert text not in line, f"{text!r} in: {line}"
    assert not outcome.stdout.strip(), f"outputs printed: {outcome.stdout}"


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id) for c in cases]


IN_PROCESS = [c for c in CASES if not c.subprocess]
SUBPROCESS = [c for c in CASES if c.subprocess]


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
@pytest.mark.parametrize("c", _params(IN_PROCESS))
def test_a_bad_input_is_one_named_error_and_changes_nothing(
    c: Case,
    world: dict[str, str],
    processes: dict[str, Future[tuple[Outcome, Any, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env_of(c, world).items():
        monkeypatch.setenv(name, value)
    before = snapshot(world)
    caplog.set_level(logging.WARNING)
    note = ""
    try:
        status: int | None = MAINS[c.component](argv_of(c, world))
    except SystemExit as exc:
        status, note = exc.code if isinstance(exc.code, int) else 1, "(SystemExit)"
    except Exception as exc:  # a bug's exception escaping main() is what this table looks for
        status, note = None, f"raised {type(exc).__name__}: {exc}"
    captured = capsys.readouterr()
    tracebacks = [r for r in caplog.records if r.exc_info]
    outcome = Outcome(
        status=status,
        error_lines=[r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR],
        stdout=captured.out,
        console=captured.err + "".join("Traceback (logged)\n" for _ in tracebacks),
        note=note,
    )
    check(c, outcome, world)
    assert snapshot(world) == before, "the store or the input files changed"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def own_world_names(c: Case, world: dict[str, str]) -> dict[str, str]:
    store = str(Path(world["root"]) / "stores" / c.id)
    return {name: value.replace(world["store"], store) for name, value in world.items()}


def own_world(c: Case, world: dict[str, str]) -> dict[str, str]:
    """The placeholders with a store of this case's own (a copy without the training run), so the
    cases that run side by side never see each other's writes."""
    names = own_world_names(c, world)
    shutil.copytree(world["store"], names["store"], ignore=shutil.ignore_patterns("runs"))
    return names


def _run_process(c: Case, shared: dict[str, str]) -> tuple[Outcome, dict[str, Any], dict[str, Any]]:
    world = own_world(c, shared)
    args = argv_of(c, world)
    module = "pipeline.cli" if c.id == "pr-through-the-sam3pipe-cli" else MODULES[c.component]
    env = single_thread_env({**os.environ, **env_of(c, world)})
    before = snapshot(world)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=c.timeout_s,
            preexec_fn=_limit_memory if c.memory_limit else None,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return Outcome(None, [], out, err, f"(still running after {c.timeout_s}s: a hang)"), before, snapshot(world)
    lines = [line for line in proc.stderr.splitlines() if " ERROR " in line or "error:" in line]
    return Outcome(proc.returncode, lines, proc.stdout, proc.stderr), before, snapshot(world)


@pytest.fixture(scope="module")
def processes(world: dict[str, str]) -> Iterator[dict[str, Future[tuple[Outcome, Any, Any]]]]:
    """Every subprocess case, started before the in-process cases run and collected after them:
    most of their time is imports, and the cases that would hang wait out their timeout meanwhile."""
    longest_first = sorted(SUBPROCESS, key=lambda c: -c.timeout_s)
    with ThreadPoolExecutor(max_workers=PROCESSES_AT_ONCE) as pool:
        yield {c.id: pool.submit(_run_process, c, world) for c in longest_first}


@pytest.mark.parametrize("c", _params(SUBPROCESS))
def test_the_console_shows_one_error_line_without_a_traceback(c: Case, world: dict[str, str], processes) -> None:
    outcome, before, after = processes[c.id].result()
    check(c, outcome, own_world_names(c, world))
    assert after == before, "the store or the input files changed"


def test_the_table_holds_at_least_60_cases_over_all_four_components() -> None:
    assert len(CASES) >= 60
    assert {c.component for c in CASES} == set(MAINS)
    assert len({c.id for c in CASES}) == len(CASES)


def test_subprocess_cases_cover_every_component() -> None:
    assert {c.component for c in SUBPROCESS} == set(MAINS)
