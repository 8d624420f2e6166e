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
import signal
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
from pipeline import cli
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.synthetic import ANNOTATIONS_FILE, SyntheticConfig, generate
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from tests.fixtures.datasets import TINY_MODEL, TINY_TRAIN, TINY_VIDEOS, single_thread_env
from tests.fixtures.mlflow import MlflowServer
from tests.fixtures.network import free_port, silent_server, web_page_server
from tests.fixtures.paths import REPO

# every test here starts processes, servers or trainings (the integration tier)
pytestmark = pytest.mark.integration

MAINS = {
    "data-prep": data_prep.main,
    "train": train.main,
    "predict": predict.main,
    "evaluate": evaluate.main,
    "sam3pipe": cli.main,
}
MODULES = {
    "data-prep": "components.data_prep",
    "train": "components.train",
    "predict": "components.predict",
    "evaluate": "components.evaluate",
    "sam3pipe": "pipeline.cli",
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
    "sam3pipe": [],
}
# The world's finished run "existing" was trained with these (output.* and mlflow.* do not shape a run):
# a copy of it under another name resumes with them, so its checkpoints are what a case tests.
EXISTING_RUN = ["train.max_steps=2", "train.checkpoint_every=2"]
# the synthetic videos of the world's dataset, as data-prep overrides (the same dataset id)
WORLD_VIDEOS = [
    "source=synthetic",
    "synthetic.num_videos=4",
    "synthetic.frames_per_video=4",
    "synthetic.height=64",
    "synthetic.width=64",
    "synthetic.min_objects=1",
    "synthetic.max_objects=2",
    "synthetic.min_size=14",
    "synthetic.max_size=30",
    "val_fraction=0.25",
]
# credentials planted in URIs and the environment: none may reach the console
PLANTED_KEY = "AKIAHOSTILEDRILL0022"
PLANTED_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYDRILL22KEY"
PLANTED_PASSWORD = "hunter2-drill-22"
# a secret that looks like words, not like a key: only knowing it (from the environment) can mask it
PLANTED_WORDS = "correct-horse-battery-staple"
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
    # a credential that must appear nowhere on the console (error line, warnings, outputs)
    secret: str = ""
    # run with the largest file this many bytes (a full disk, as a write sees it: EFBIG instead of ENOSPC)
    file_size_limit: int = 0
    # the class of issue 22's second drill the case belongs to (1-8), 0 for the first table
    drill: int = 0


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

# ---------------------------------------------------------------------------- issue 22: the second drill, by class
PRED_BBOX = "{preds}/coco_predictions_bbox.json"
PRED_SEGM = "{preds}/coco_predictions_segm.json"


def frame_gt_case(id: str, variant: str, names: tuple[str, ...], iou: str = "bbox") -> Case:
    """Evaluate real predictions against a frame GT with one flaw: refused, naming the GT file and the field."""
    predictions = PRED_BBOX if iou == "bbox" else PRED_SEGM
    return case(
        id,
        "evaluate",
        ("--gt", f"{{files}}/gt/{variant}.json", "--predictions", predictions, f"iou_types=[{iou}]"),
        (f"{variant}.json", *names),
        drill=3,
    )


def run_case(id: str, run: str, names: tuple[str, ...], *extra: str, **kw: Any) -> Case:
    """Train into a copy of the world's finished run `run` (tampered), with the config that trained it."""
    return case(id, "train", (*EXISTING_RUN, f"output.run_name={run}", *extra), names, drill=kw.pop("drill", 2), **kw)


HANG = {"subprocess": True, "timeout_s": HANG_TIMEOUT_S}
DRILL = [
    # ------------------------------------------------ 1. an output never replaces an input or an earlier output
    case(
        "ev-output-is-the-gt",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={gt}"),
        ("val.json", "is the input gt"),
        drill=1,
    ),
    case(
        "ev-output-is-the-predictions-file",
        "evaluate",
        ("--gt", "{frames_gt}", "--predictions", PRED_BBOX, "iou_types=[bbox]", f"output={PRED_BBOX}"),
        ("coco_predictions_bbox.json", "is the input predictions"),
        drill=1,
    ),
    case(
        "ev-output-is-a-file-of-the-predictions-folder",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={preds}/video_predictions.json"),
        ("video_predictions.json", "is the input predictions"),
        drill=1,
    ),
    case(
        "ev-output-inside-the-published-dataset",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={dataset}/eval/metrics.json"),
        ("published dataset", "{dataset}"),
        drill=1,
    ),
    case(
        "ev-rerun-to-an-output-with-other-settings",
        "evaluate",
        (
            "--gt",
            "{gt}",
            "--predictions",
            "{preds}",
            "iou_types=[bbox]",
            "output={store}/evaluation/existing/metrics.json",
        ),
        ("metrics.json", "iou_types", "overwrite=true"),
        drill=1,
    ),
    case(
        "ev-rerun-to-an-output-with-other-predictions",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{files}/preds_copy", "output={store}/evaluation/existing/metrics.json"),
        ("metrics.json", "predictions", "overwrite=true"),
        drill=1,
    ),
    case(
        "ev-output-holding-metrics-of-unknown-settings",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "output={files}/old_eval/metrics.json"),
        ("old_eval/metrics.json", "unknown settings", "overwrite=true"),
        drill=1,
    ),
    case(
        "pr-output-inside-the-dataset",
        "predict",
        "output.uri={dataset}/predictions",
        ("lies inside the input data.uri", "output.uri"),
        drill=1,
    ),
    case(
        "pr-output-is-the-dataset", "predict", "output.uri={dataset}", ("is the input data.uri", "output.uri"), drill=1
    ),
    case(
        "pr-output-holds-the-checkpoint",
        "predict",
        "output.uri={files}",
        ("contains the input model.uri", "model.pt"),
        drill=1,
    ),
    case("pr-output-is-the-checkpoint", "predict", "output.uri={ckpt}", ("is the input model.uri",), drill=1),
    run_case(
        "tr-resume-false-on-a-finished-run",
        "existing",
        ("train.resume=false", "output.overwrite=true", "existing"),
        "train.resume=false",
        drill=1,
    ),
    case(
        "tr-run-folder-inside-the-dataset",
        "train",
        "output.store={dataset}",
        ("lies inside the input data.uri",),
        drill=1,
    ),
    case(
        "tr-run-folder-inside-another-published-dataset",
        "train",
        ("output.store={many_dataset}", "data.uri={dataset}"),
        ("published dataset", "{many_dataset}"),
        drill=1,
    ),
    case(
        "tr-run-folder-holding-its-starting-checkpoint",
        "train",
        ("output.run_name=existing", "model.uri={store}/runs/existing/checkpoints/best.pt"),
        ("contains the input model.uri", "output.run_name"),
        drill=1,
    ),
    case(
        "dp-store-inside-a-published-dataset", "data-prep", "store={dataset}", ("published dataset", "store"), drill=1
    ),
    case(
        "tr-another-config-names-the-way-to-replace-it",
        "train",
        ("output.run_name=existing", "optim.lr=0.002"),
        ("existing", "optim.lr", "output.overwrite=true"),
        drill=1,
    ),
    # ------------------------------------------------ 2. a resume or rerun that does not match its run
    run_case("tr-config-yaml-missing", "nocfg", ("config.yaml", "missing", "output.overwrite=true")),
    run_case("tr-config-yaml-corrupt", "badyaml", ("config.yaml", "unreadable")),
    run_case("tr-config-yaml-not-a-mapping", "listyaml", ("config.yaml", "holds a list")),
    run_case("tr-config-yaml-lacking-keys", "fewkeys", ("another config", "absent")),
    run_case("tr-last-pt-step-negative", "negstep", ("last.pt", "step", "-1", "train.max_steps=2")),
    run_case("tr-last-pt-step-past-max-steps", "paststep", ("last.pt", "step", "99")),
    run_case("tr-last-pt-step-not-an-integer", "textstep", ("last.pt", "step")),
    run_case("tr-last-pt-of-another-preset", "otherpreset", ("last.pt", "another model preset")),
    run_case("tr-last-pt-without-optimizer-state", "nooptim", ("last.pt", "optimizer")),
    run_case("tr-last-pt-is-an-exported-best-pt", "exported", ("last.pt", "resumable")),
    run_case(
        "tr-last-pt-not-a-checkpoint", "textlast", ("last.pt", "not a torch checkpoint"), forbid=("sam3pipe-ckpt",)
    ),
    case(
        "tr-best-metric-no-validator-logs",
        "train",
        "train.best_metric=val/accuracy",
        ("train.best_metric", "val/loss"),
        drill=2,
    ),
    case(
        "tr-best-metric-diagnostic-without-diagnostics",
        "train",
        "train.best_metric=diag/val_top_box_iou",
        ("train.best_metric", "train.diagnostics=true"),
        drill=2,
    ),
    case(
        "dp-reused-dataset-with-a-changed-frame",
        "data-prep",
        (*WORLD_VIDEOS, "store={files}/tampered/frame"),
        ("frames/", "overwrite=true"),
        base=False,
        drill=2,
    ),
    case(
        "dp-reused-dataset-with-a-changed-manifest",
        "data-prep",
        (*WORLD_VIDEOS, "store={files}/tampered/manifest"),
        ("manifest.json", "overwrite=true"),
        base=False,
        drill=2,
    ),
    case(
        "dp-reused-dataset-missing-a-file",
        "data-prep",
        (*WORLD_VIDEOS, "store={files}/tampered/missing"),
        ("val.json", "cannot be read", "overwrite=true"),
        base=False,
        drill=2,
    ),
    case(
        "tr-dataset-frame-changed-says-how-to-repair",
        "train",
        # the frame is read by the first step, after the run folder is made: in a store outside the snapshot
        ("data.uri={tampered_frame_dataset}", "output.store={root}/scratch-store"),
        ("frames/", "overwrite=true"),
        forbid=("re-run data_prep",),
        drill=2,
    ),
    # ------------------------------------------------ 3. invalid GT never scores: the frame path as strict as the video path
    frame_gt_case("ev-frame-gt-duplicate-annotation-id", "dup_annotation_id", ("annotations[1].id", "duplicate")),
    frame_gt_case("ev-frame-gt-nan-box", "nan_box", ("annotations[0].bbox", "finite")),
    frame_gt_case("ev-frame-gt-infinite-box", "inf_box", ("annotations[0].bbox", "finite")),
    frame_gt_case("ev-frame-gt-negative-box-size", "negative_box", ("annotations[0].bbox",)),
    frame_gt_case("ev-frame-gt-negative-area", "negative_area", ("annotations[0].area",)),
    frame_gt_case("ev-frame-gt-nan-area", "nan_area", ("annotations[0].area", "finite")),
    frame_gt_case("ev-frame-gt-duplicate-image-id", "dup_image_id", ("images[1].id", "duplicate")),
    frame_gt_case("ev-frame-gt-duplicate-category-id", "dup_category_id", ("categories[", "duplicate")),
    frame_gt_case("ev-frame-gt-category-id-past-int64", "big_category_id", ("categories[0].id", "64 bits")),
    frame_gt_case("ev-frame-gt-iscrowd-two", "iscrowd_two", ("annotations[0].iscrowd",)),
    frame_gt_case("ev-frame-gt-polygon-with-nan", "nan_polygon", ("annotations[0].segmentation", "finite"), iou="segm"),
    frame_gt_case("ev-frame-gt-mask-of-another-size", "rle_size", ("annotations[0].segmentation",), iou="segm"),
    frame_gt_case("ev-frame-gt-image-without-size", "no_image_size", ("images[0].height", "missing")),
    frame_gt_case("ev-frame-gt-annotation-without-box", "no_bbox", ("annotations[0].bbox", "missing")),
    case(
        "ev-frames-gt-beside-video-gt-duplicate-id",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "--frames-gt", "{files}/gt/dup_annotation_id.json"),
        ("dup_annotation_id.json", "annotations[1].id"),
        drill=3,
    ),
    case(
        "ev-video-gt-id-twice-in-two-videos",
        "evaluate",
        ("--gt", "{files}/gt/video_dup_id.json", "--predictions", "{preds}"),
        ("video_dup_id.json", ".id", "duplicate"),
        drill=3,
    ),
    case(
        "ev-video-gt-video-id-past-int64",
        "evaluate",
        ("--gt", "{files}/gt/video_big_id.json", "--predictions", "{preds}"),
        ("video_big_id.json", "videos[0].id"),
        drill=3,
    ),
    case(
        "ev-frame-predictions-category-past-int64",
        "evaluate",
        ("--gt", "{frames_gt}", "--predictions", "{files}/big_category_bbox.json", "iou_types=[bbox]"),
        ("big_category_bbox.json", "category_id", "64 bits"),
        drill=3,
    ),
    case(
        "dp-category-id-past-int64",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/big_category.json", "frames_root={ytvis}"),
        ("big_category.json", "categories[0].id", "64 bits"),
        drill=3,
    ),
    # ------------------------------------------------ 4. no false success
    case(
        "dp-store-endpoint-answers-web-pages",
        "data-prep",
        "store=s3://bucket/store",
        ("web page", "AWS_ENDPOINT_URL"),
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:{html}", "SAM3PIPE_S3_MAX_ATTEMPTS": "1"},
        drill=4,
    ),
    case(
        "ev-gt-endpoint-answers-web-pages",
        "evaluate",
        ("--gt", "s3://bucket/gt.json", "--predictions", "{preds}"),
        ("s3://bucket/gt.json",),
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:{html}", "SAM3PIPE_S3_MAX_ATTEMPTS": "1"},
        drill=4,
    ),
    case(
        "tr-dataset-endpoint-answers-web-pages",
        "train",
        "data.uri=s3://bucket/datasets/x",
        ("s3://bucket/datasets/x", "manifest.json"),
        env={"AWS_ENDPOINT_URL": "http://127.0.0.1:{html}", "SAM3PIPE_S3_MAX_ATTEMPTS": "1"},
        drill=4,
    ),
    case(
        "tr-tracking-server-cannot-register-a-local-checkpoint",
        "train",
        "mlflow.enabled=true",
        ("output.store", "s3://", "mlflow.enabled=false"),
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}"},
        drill=4,
    ),
    case(
        "submit-to-a-web-page-not-kfp",
        "sam3pipe",
        ("submit", "--host", "http://127.0.0.1:{html}", "max_steps=5"),
        ("127.0.0.1:{html}", "no run id"),
        env={"SAM3PIPE_KFP_TIMEOUT_S": "10"},
        drill=4,
    ),
    case(
        "submit-to-a-host-that-is-no-url",
        "sam3pipe",
        ("submit", "--host", "ftp://kfp.example", "max_steps=5"),
        ("--host", "http"),
        drill=4,
    ),
    # ------------------------------------------------ 5. every wait bounded: a hang is one named line
    case(
        "dp-fifo-among-the-frames",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/fifo_frame.json", "frames_root={ytvis}"),
        ("fifo_frame.json", "file_names[0]", "FIFO"),
        drill=5,
        **HANG,
    ),
    case(
        "dp-annotations-are-a-fifo",
        "data-prep",
        ("source=ytvis", "annotations={files}/fifo.json", "frames_root={ytvis}"),
        ("fifo.json", "FIFO"),
        drill=5,
        **HANG,
    ),
    case("tr-checkpoint-is-a-fifo", "train", "model.uri={files}/fifo.pt", ("fifo.pt", "FIFO"), drill=5, **HANG),
    case(
        "ev-gt-is-a-fifo",
        "evaluate",
        ("--gt", "{files}/fifo.json", "--predictions", "{preds}"),
        ("fifo.json", "FIFO"),
        drill=5,
        **HANG,
    ),
    case(
        "submit-to-a-host-that-never-answers",
        "sam3pipe",
        ("submit", "--host", "http://127.0.0.1:{silent}", "max_steps=5"),
        ("127.0.0.1:{silent}", "timed out", "SAM3PIPE_KFP_TIMEOUT_S"),
        env={"SAM3PIPE_KFP_TIMEOUT_S": "2"},
        drill=5,
        **HANG,
    ),
    case(
        "reproduce-dry-run-against-a-silent-tracking-server",
        "sam3pipe",
        ("reproduce", "0123456789abcdef0123456789abcdef", "--dry-run"),
        ("127.0.0.1:{silent}", "did not answer"),
        env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{silent}", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
        drill=5,
        **HANG,
    ),
    case(
        "compile-sweep-spec-is-a-fifo",
        "sam3pipe",
        ("compile", "--output", "{root}/never.yaml", "--sweep", "{files}/fifo.json"),
        ("fifo.json", "FIFO"),
        drill=5,
        **HANG,
    ),
    case(
        "pr-dataset-endpoint-never-answers",
        "predict",
        "data.uri=s3://bucket/datasets/x",
        ("s3://bucket/datasets/x",),
        env={
            "AWS_ENDPOINT_URL": "http://127.0.0.1:{silent}",
            "SAM3PIPE_S3_MAX_ATTEMPTS": "2",
            "SAM3PIPE_S3_READ_TIMEOUT_S": "1",
            "SAM3PIPE_S3_CONNECT_TIMEOUT_S": "1",
        },
        drill=5,
        **HANG,
    ),
    # ------------------------------------------------ 6. no credential in any message
    case(
        "tr-credentials-in-the-dataset-uri",
        "train",
        f"data.uri=s3://{PLANTED_KEY}:{PLANTED_SECRET}@bucket/datasets/x",
        ("cannot carry credentials",),
        secret=PLANTED_SECRET,
        drill=6,
    ),
    case(
        "pr-credentials-in-the-dataset-uri",
        "predict",
        f"data.uri=s3://{PLANTED_KEY}:{PLANTED_SECRET}@bucket/datasets/x",
        ("data.uri",),
        secret=PLANTED_SECRET,
        drill=6,
    ),
    case(
        "ev-credentials-in-the-gt-uri",
        "evaluate",
        ("--gt", f"s3://{PLANTED_KEY}:{PLANTED_SECRET}@bucket/val.json", "--predictions", "{preds}"),
        ("cannot carry credentials",),
        secret=PLANTED_SECRET,
        drill=6,
    ),
    case(
        "dp-credentials-in-the-store-uri",
        "data-prep",
        f"store=s3://{PLANTED_KEY}:{PLANTED_SECRET}@bucket/store",
        ("store",),
        secret=PLANTED_SECRET,
        drill=6,
    ),
    case(
        "pr-password-in-an-http-model-uri",
        "predict",
        f"model.uri=http://admin:{PLANTED_PASSWORD}@models.example.com/model.pt",
        ("models.example.com",),
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    case(
        "tr-password-in-an-http-model-uri",
        "train",
        f"model.uri=http://admin:{PLANTED_PASSWORD}@models.example.com/model.pt",
        ("models.example.com",),
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    case(
        "tr-password-in-a-model-uri-with-tracking-on",
        "train",
        (f"model.uri=http://admin:{PLANTED_PASSWORD}@models.example.com/model.pt", "mlflow.enabled=true"),
        ("models.example.com",),
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    case(
        "dp-password-in-the-endpoint-variable",
        "data-prep",
        "store=s3://bucket/store",
        ("127.0.0.1:{closed}",),
        env={
            "AWS_ENDPOINT_URL": f"http://user:{PLANTED_PASSWORD}@127.0.0.1:{{closed}}",
            "SAM3PIPE_S3_MAX_ATTEMPTS": "1",
        },
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    case(
        "tr-password-in-a-tracking-uri-of-no-known-scheme",
        "train",
        "mlflow.enabled=true",
        ("MLFLOW_TRACKING_URI",),
        env={"MLFLOW_TRACKING_URI": f"ftp://user:{PLANTED_PASSWORD}@tracking.example.com"},
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    case(
        "ev-secret-environment-value-echoed-by-an-error",
        "evaluate",
        ("--gt", f"{{files}}/{PLANTED_WORDS}.json", "--predictions", "{preds}"),
        ("***.json",),
        env={"AWS_SECRET_ACCESS_KEY": PLANTED_WORDS},
        secret=PLANTED_WORDS,
        drill=6,
    ),
    case(
        "submit-password-in-the-host",
        "sam3pipe",
        ("submit", "--host", f"http://admin:{PLANTED_PASSWORD}@127.0.0.1:{{closed}}", "max_steps=5"),
        ("127.0.0.1:{closed}",),
        env={"SAM3PIPE_KFP_TIMEOUT_S": "5"},
        secret=PLANTED_PASSWORD,
        drill=6,
    ),
    # ------------------------------------------------ 7. one named line before work starts, not a traceback later
    case(
        "dp-annotations-nested-too-deeply",
        "data-prep",
        ("source=ytvis", "annotations={files}/deep.json", "frames_root={ytvis}"),
        ("deep.json", "nested too deeply"),
        drill=7,
    ),
    case(
        "ev-gt-nested-too-deeply",
        "evaluate",
        ("--gt", "{files}/deep.json", "--predictions", "{preds}"),
        ("deep.json", "nested"),
        drill=7,
    ),
    case(
        "ev-predictions-nested-too-deeply",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{files}/deep.json"),
        ("deep.json", "nested"),
        drill=7,
    ),
    case(
        "dp-nul-byte-in-a-frame-name",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/nul_name.json", "frames_root={ytvis}"),
        ("nul_name.json", "file_names[0]", "NUL"),
        drill=7,
    ),
    case("tr-nul-byte-in-the-dataset-uri", "train", "data.uri={files}/a\x00b", ("NUL",), drill=7),
    case(
        "ev-nul-byte-in-the-gt-uri",
        "evaluate",
        ("--gt", "{files}/gt\x00.json", "--predictions", "{preds}"),
        ("NUL",),
        drill=7,
    ),
    case("tr-num-queries-huge", "train", "model.num_queries=1000000000", "model.num_queries", drill=7),
    case("tr-d-model-huge", "train", "model.d_model=800000", "model.d_model", drill=7),
    case("tr-mlp-ratio-huge", "train", "model.vit_mlp_ratio=1e9", "model.vit_mlp_ratio", drill=7),
    case(
        "tr-weight-decay-huge", "train", "optim.weight_decay=1e30", ("optim.weight_decay", "lr * weight_decay"), drill=7
    ),
    case(
        "pr-too-many-categories-to-detect-at-once",
        "predict",
        ("data.uri={many_dataset}", "model.image_size=1008", "detection.prompt_batch=0"),
        ("val.json", "categories", "GiB", "detection.prompt_batch"),
        drill=7,
    ),
    case(
        "tr-tracking-uri-of-no-known-scheme",
        "train",
        "mlflow.enabled=true",
        ("MLFLOW_TRACKING_URI", "ftp"),
        env={"MLFLOW_TRACKING_URI": "ftp://tracking.example.com/mlflow"},
        drill=7,
    ),
    case(
        "ev-tracking-uri-of-no-known-scheme",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "mlflow.enabled=true"),
        ("MLFLOW_TRACKING_URI",),
        env={"MLFLOW_TRACKING_URI": "gopher://tracking.example.com"},
        drill=7,
    ),
    case(
        "compile-output-under-a-file",
        "sam3pipe",
        ("compile", "--output", "{files}/plain.txt/pipeline.yaml"),
        ("plain.txt",),
        drill=7,
    ),
    case(
        "run-local-max-steps-negative-refused-before-any-component",
        "sam3pipe",
        ("run", "--local", "--pipeline-root", "{root}/kfp-never", "max_steps=-5"),
        ("max_steps", ">= 1"),
        drill=7,
    ),
    case(
        "sweep-spec-nested-too-deeply",
        "sam3pipe",
        ("compile", "--output", "{root}/never.yaml", "--sweep", "[" * 5000 + "]" * 5000),
        ("sweep", "nested"),
        drill=7,
    ),
    # ------------------------------------------------ 8. messages that name the right thing
    case(
        "pr-checkpoint-is-a-folder",
        "predict",
        "model.uri={files}/ytvis",
        ("{files}/ytvis", "folder"),
        forbid=("sam3pipe-predict", "checkpoint.pt"),
        drill=8,
    ),
    case(
        "tr-checkpoint-is-a-folder",
        "train",
        "model.uri={files}/ytvis",
        ("{files}/ytvis", "folder"),
        forbid=("sam3pipe-ckpt", "checkpoint.pt"),
        drill=8,
    ),
    case(
        "dp-frame-symlinked-from-outside-frames-root",
        "data-prep",
        ("source=ytvis", "annotations={ytvis}/symlink_outside.json", "frames_root={ytvis}"),
        ("symlink_outside.json", "file_names[0]", "outside frames_root"),
        drill=8,
    ),
    case(
        "ev-hydra-run-dir-is-not-ignored",
        "evaluate",
        ("--gt", "{gt}", "--predictions", "{preds}", "hydra.run.dir=/tmp/x"),
        "hydra.run.dir",
        drill=8,
    ),
    case("tr-hydra-job-setting-is-not-ignored", "train", "hydra.job.chdir=true", "hydra.job.chdir", drill=8),
    case("dp-hydra-group-is-not-ignored", "data-prep", "hydra/job_logging=disabled", "hydra/job_logging", drill=8),
    case(
        "tr-starting-weights-that-make-nan-outputs",
        "train",
        ("model.uri={files}/nan_model.pt", "output.store={root}/scratch-nan"),
        ("NaN", "optim.lr"),
        drill=7,
    ),
    case(
        "tr-checkpoint-write-on-a-full-disk",
        "train",
        "output.store={root}/scratch-full",
        ("TMPDIR", ".pt"),
        subprocess=True,
        file_size_limit=1024 * 1024,
        drill=7,
    ),
    case(
        "tr-diverging-before-the-first-checkpoint",
        "train",
        ("loss.loss_ce=1e300", "output.store={root}/scratch-diverge"),
        ("step 1", "no checkpoint was saved"),
        forbid=("last.pt",),
        drill=8,
    ),
]
CASES += DRILL


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


def _write_frame_gt_variants(frames_gt: dict[str, Any], out: Path) -> None:
    """The dataset's frame GT with one flaw each (issue 22: a flawed GT must never score)."""

    def variant(name: str, change: Any) -> None:
        data = json.loads(json.dumps(frames_gt))
        change(data)
        _write_json(out / f"{name}.json", data)

    anns = "annotations"
    variant("dup_annotation_id", lambda d: d[anns][1].__setitem__("id", d[anns][0]["id"]))
    variant("nan_box", lambda d: d[anns][0]["bbox"].__setitem__(0, math.nan))
    variant("inf_box", lambda d: d[anns][0]["bbox"].__setitem__(2, math.inf))
    variant("negative_box", lambda d: d[anns][0]["bbox"].__setitem__(2, -3.0))
    variant("negative_area", lambda d: d[anns][0].__setitem__("area", -5.0))
    variant("nan_area", lambda d: d[anns][0].__setitem__("area", math.nan))
    variant("dup_image_id", lambda d: d["images"][1].__setitem__("id", d["images"][0]["id"]))
    variant("dup_category_id", lambda d: d["categories"].append({**d["categories"][0], "name": "a twin"}))
    variant("iscrowd_two", lambda d: d[anns][0].__setitem__("iscrowd", 2))
    variant("nan_polygon", lambda d: d[anns][0].__setitem__("segmentation", [[1.0, 2.0, math.nan, 4.0, 5.0, 6.0]]))
    variant("no_image_size", lambda d: d["images"][0].pop("height"))
    variant("no_bbox", lambda d: d[anns][0].pop("bbox"))

    def rle_size(d: dict[str, Any]) -> None:
        size = d[anns][0]["segmentation"]["size"]
        d[anns][0]["segmentation"]["size"] = [size[0] + 1, size[1]]

    def big_category(d: dict[str, Any]) -> None:
        old = d["categories"][0]["id"]
        d["categories"][0]["id"] = 2**70
        for ann in d[anns]:
            if ann["category_id"] == old:
                ann["category_id"] = 2**70

    variant("rle_size", rle_size)
    variant("big_category_id", big_category)


def _write_video_gt_variants(gt: dict[str, Any], out: Path) -> None:
    """The dataset's video GT with one flaw each."""
    twice = json.loads(json.dumps(gt))
    copy = {**twice["videos"][0], "id": 999}
    twice["videos"].append(copy)
    twice["annotations"] += [
        {**a, "video_id": 999} for a in gt["annotations"] if a["video_id"] == gt["videos"][0]["id"]
    ]
    _write_json(out / "video_dup_id.json", twice)
    big = json.loads(json.dumps(gt))
    old = big["videos"][0]["id"]
    big["videos"][0]["id"] = 2**70
    for ann in big["annotations"]:
        if ann["video_id"] == old:
            ann["video_id"] = 2**70
    _write_json(out / "video_big_id.json", big)


def _tampered_runs(store: Path) -> None:
    """Copies of the finished run "existing", each broken in one way a resume must refuse."""
    existing = store / "runs" / "existing"

    def copy(name: str) -> Path:
        shutil.copytree(existing, store / "runs" / name)
        return store / "runs" / name

    def with_last(name: str, change: Any) -> None:
        last = copy(name) / "checkpoints" / "last.pt"
        state = torch.load(last, weights_only=True)
        torch.save(change(state), last)

    (copy("nocfg") / "config.yaml").unlink()
    (copy("badyaml") / "config.yaml").write_text("model: [unclosed\n  : : :\n")
    (copy("listyaml") / "config.yaml").write_text("- 1\n- 2\n")
    fewkeys = copy("fewkeys") / "config.yaml"
    fewkeys.write_text("\n".join(line for line in fewkeys.read_text().splitlines() if "lr:" not in line) + "\n")
    with_last("negstep", lambda s: {**s, "step": -1})
    with_last("paststep", lambda s: {**s, "step": 99})
    with_last("textstep", lambda s: {**s, "step": "3"})
    with_last("nooptim", lambda s: {k: v for k, v in s.items() if k != "optimizer"})

    def other_preset(state: dict[str, Any]) -> dict[str, Any]:
        other = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, d_model=32)))
        return {**state, "model": other.state_dict()}

    with_last("otherpreset", other_preset)
    exported = copy("exported")
    shutil.copyfile(exported / "checkpoints" / "best.pt", exported / "checkpoints" / "last.pt")
    (copy("textlast") / "checkpoints" / "last.pt").write_text("not a checkpoint\n")


def _tampered_datasets(dataset: Path, files: Path) -> dict[str, str]:
    """Stores holding a copy of the world's dataset, each changed after it was published."""
    out = {}
    for kind in ("frame", "manifest", "missing"):
        copied = files / "tampered" / kind / "datasets" / dataset.name
        shutil.copytree(dataset, copied)
        out[kind] = str(copied)
    for frame in (files / "tampered" / "frame" / "datasets" / dataset.name / "frames").rglob("*"):
        if frame.is_file():  # every frame: the first clip a training reads meets one
            data = bytearray(frame.read_bytes())
            data[len(data) // 2] ^= 0xFF
            frame.write_bytes(bytes(data))
    manifest = files / "tampered" / "manifest" / "datasets" / dataset.name / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["counts"]["videos"] += 1
    manifest.write_text(json.dumps(edited, indent=2) + "\n")
    (files / "tampered" / "missing" / "datasets" / dataset.name / "val.json").unlink()
    return out


def _many_categories_dataset(files: Path, store: Path) -> str:
    """A published dataset whose vocabulary holds 10,000 phrases: every one a prompt on every frame."""
    root = files / "many"
    annotations = json.loads(
        generate(
            SyntheticConfig(num_videos=2, frames_per_video=2, height=32, width=32, min_size=8, max_size=16), root
        ).read_text()
    )
    top = max(c["id"] for c in annotations["categories"])
    annotations["categories"] += [{"id": top + 1 + i, "name": f"phrase number {i}"} for i in range(10_000)]
    _write_json(root / "many.json", annotations)
    cfg = DataPrepConfig(
        source="ytvis", annotations=str(root / "many.json"), frames_root=str(root), store=str(store), val_fraction=0.5
    )
    return prepare_dataset(cfg).uri


def _drill_world(root: Path, store: Path, files: Path, dataset: str, preds: Path) -> dict[str, str]:
    """What issue 22's cases need besides the first table's world; their placeholders."""
    ytvis = files / "ytvis"
    os.mkfifo(files / "fifo.json")
    os.mkfifo(files / "fifo.pt")
    os.mkfifo(ytvis / "frames" / "fifo.jpg")
    shutil.copyfile(ytvis / "frames" / "whole.jpg", files / "outside.jpg")
    (ytvis / "frames" / "outside_link.jpg").symlink_to(files / "outside.jpg")
    annotations = json.loads((ytvis / ANNOTATIONS_FILE).read_text())

    def variant(name: str, change: Any) -> None:
        data = json.loads(json.dumps(annotations))
        change(data)
        _write_json(ytvis / f"{name}.json", data)

    variant("fifo_frame", lambda d: d["videos"][0]["file_names"].__setitem__(0, "frames/fifo.jpg"))
    variant("symlink_outside", lambda d: d["videos"][0]["file_names"].__setitem__(0, "frames/outside_link.jpg"))
    variant("nul_name", lambda d: d["videos"][0]["file_names"].__setitem__(0, "frames/a\x00b.jpg"))

    def big_category(d: dict[str, Any]) -> None:
        old = d["categories"][0]["id"]
        d["categories"][0]["id"] = 2**70
        for ann in d["annotations"]:
            if ann["category_id"] == old:
                ann["category_id"] = 2**70

    variant("big_category", big_category)
    (files / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    dataset_path = Path(dataset)
    _write_frame_gt_variants(json.loads((dataset_path / "val_frames_coco.json").read_text()), files / "gt")
    _write_video_gt_variants(json.loads((dataset_path / "val.json").read_text()), files / "gt")
    bbox = json.loads((preds / PREDICTION_FILES["bbox"]).read_text())
    _write_json(files / "big_category_bbox.json", [{**bbox[0], "category_id": 2**70}, *bbox[1:]])
    shutil.copytree(preds, files / "preds_copy")
    _write_json(files / "old_eval" / "metrics.json", {"bbox_AP": 0.5})
    nan_model = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56)))
    with torch.no_grad():
        for parameter in nan_model.parameters():
            parameter.fill_(math.nan)
    save_checkpoint({"model": nan_model.state_dict()}, str(files / "nan_model.pt"), step=0)
    _tampered_runs(store)
    tampered = _tampered_datasets(dataset_path, files)
    output = store / "evaluation" / "existing" / "metrics.json"
    assert (
        evaluate.main(
            [
                "--gt",
                f"{dataset}/val.json",
                "--predictions",
                str(preds),
                "--output",
                str(output),
                "mlflow.enabled=false",
            ]
        )
        == 0
    )
    return {
        "tampered_frame_dataset": tampered["frame"],
        "many_dataset": _many_categories_dataset(files, store),
    }


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """A server answering every request with a web page, and one that never answers: {html}, {silent}."""
    with web_page_server() as html, silent_server() as silent:
        yield {"html": str(html), "silent": str(silent)}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None, servers: dict[str, str]
) -> dict[str, str]:
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
        drill = _drill_world(root, store, files, dataset.uri, preds)
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
        **drill,
        **servers,
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
    if c.secret:
        assert c.secret not in outcome.console + line + outcome.stdout, "a credential reached the console"


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
        console=captured.err
        + "".join(f"{r.levelname} {r.getMessage()}\n" for r in caplog.records)
        + "".join("Traceback (logged)\n" for _ in tracebacks),
        note=note,
    )
    check(c, outcome, world)
    assert snapshot(world) == before, "the store or the input files changed"


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def _limits(c: Case) -> Any:
    """The child's resource limits, set between fork and exec."""
    if not (c.memory_limit or c.file_size_limit):
        return None

    def apply() -> None:
        if c.memory_limit:
            _limit_memory()
        if c.file_size_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (c.file_size_limit, c.file_size_limit))

    return apply


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
            preexec_fn=_limits(c),
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


def test_the_second_drill_adds_at_least_60_cases_over_its_eight_classes() -> None:
    assert len(DRILL) >= 60
    assert {c.drill for c in DRILL} == set(range(1, 9))
    assert all(sum(c.drill == k for c in DRILL) >= 3 for k in range(1, 9))


def test_subprocess_cases_cover_every_component() -> None:
    assert {c.component for c in SUBPROCESS} == set(MAINS)


# ---------------------------------------------------------------------------- issue 22: what is accepted, and how


def _run_main(
    main: Any, argv: list[str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str], str]:
    """Exit status, error lines, warning lines and stdout of one in-process run of a CLI's main."""
    caplog.clear()
    caplog.set_level(logging.WARNING)
    status = main(argv)
    out = capsys.readouterr().out
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return status, errors, warnings, out


@pytest.fixture
def in_world(world: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The world's environment for one test run in this process."""
    for name in ("SAM3PIPE_STORE", "SAM3PIPE_CACHE", "MLFLOW_TRACKING_URI", *FAKE_AWS):
        monkeypatch.setenv(name, world[name])
    return world


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_a_config_error_found_while_training_leaves_a_folder_the_corrected_command_takes_over(
    in_world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [_fill(a, in_world) for a in TRAIN_BASE] + [f"output.store={tmp_path}", "output.run_name=named"]
    status, errors, _, _ = _run_main(
        train.main, [*base, "train.best_metric=train/los", "train.best_mode=min"], caplog, capsys
    )
    assert status == 2 and len(errors) == 1 and "train.best_metric=train/los" in errors[0]
    status, errors, _, out = _run_main(
        train.main, [*base, "train.best_metric=train/loss", "train.best_mode=min"], caplog, capsys
    )
    assert status == 0, errors
    assert "best_metric: train/loss" in (tmp_path / "runs" / "named" / "config.yaml").read_text()
    assert json.loads(out)["run_uri"].endswith("runs/named")


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_overwrite_true_trains_a_finished_run_again_from_the_start_and_warns_of_a_warmup_past_the_end(
    in_world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(Path(in_world["store"]) / "runs" / "existing", tmp_path / "runs" / "existing")
    before = (tmp_path / "runs" / "existing" / "checkpoints" / "last.pt").read_bytes()
    argv = [
        *(_fill(a, in_world) for a in TRAIN_BASE),
        *EXISTING_RUN,
        f"output.store={tmp_path}",
        "output.run_name=existing",
        "train.resume=false",
        "output.overwrite=true",
        "optim.warmup_steps=5",
    ]
    status, errors, warnings, _ = _run_main(train.main, argv, caplog, capsys)
    assert status == 0, errors
    assert any("optim.warmup_steps=5 is more than train.max_steps=2" in w for w in warnings), warnings
    assert any("removing the earlier training outputs" in w for w in warnings), warnings
    run = tmp_path / "runs" / "existing"
    assert (run / "checkpoints" / "last.pt").read_bytes() != before
    assert "warmup_steps: 5" in (run / "config.yaml").read_text()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_evaluate_writes_again_for_the_same_settings_and_replaces_other_metrics_only_with_overwrite(
    in_world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--gt", in_world["gt"], "--predictions", in_world["preds"], "--output", str(tmp_path / "metrics.json")]
    argv.append("mlflow.enabled=false")
    assert _run_main(evaluate.main, argv, caplog, capsys)[0] == 0
    first = (tmp_path / "metrics.json").read_bytes()
    assert _run_main(evaluate.main, argv, caplog, capsys)[0] == 0  # a retried step: the same settings
    status, errors, _, _ = _run_main(evaluate.main, [*argv, "iou_types=[bbox]"], caplog, capsys)
    assert status == 2 and "overwrite=true" in errors[0]
    assert (tmp_path / "metrics.json").read_bytes() == first
    assert _run_main(evaluate.main, [*argv, "iou_types=[bbox]", "overwrite=true"], caplog, capsys)[0] == 0
    record = json.loads((tmp_path / "evaluate_settings.json").read_text())
    assert record["settings"]["iou_types"] == ["bbox"]


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_data_prep_with_overwrite_repairs_a_changed_dataset_and_then_reuses_it(
    in_world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(Path(in_world["files"]) / "tampered" / "frame", tmp_path / "store")
    argv = [*WORLD_VIDEOS, f"store={tmp_path / 'store'}"]
    status, errors, _, _ = _run_main(data_prep.main, argv, caplog, capsys)
    assert status == 2 and "overwrite=true" in errors[0]
    status, errors, _, out = _run_main(data_prep.main, [*argv, "overwrite=true"], caplog, capsys)
    assert status == 0, errors
    assert json.loads(out)["dataset_uri"] == in_world["dataset"].replace(in_world["store"], str(tmp_path / "store"))
    assert _run_main(data_prep.main, argv, caplog, capsys)[0] == 0  # checked, and reused as it is


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_frames_of_one_pixel_are_prepared_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "frames").mkdir()
    videos, annotations = [], []
    for video_id in (1, 2):
        Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "frames" / f"{video_id}.png")
        videos.append({"id": video_id, "width": 1, "height": 1, "file_names": [f"frames/{video_id}.png"]})
        mask = {"size": [1, 1], "counts": [0, 1]}
        annotations.append(
            {"id": video_id, "video_id": video_id, "category_id": 1, "segmentations": [mask], "bboxes": [[0, 0, 1, 1]]}
        )
    _write_json(
        tmp_path / "dots.json", {"videos": videos, "annotations": annotations, "categories": [{"id": 1, "name": "dot"}]}
    )
    argv = [
        "source=ytvis",
        f"annotations={tmp_path / 'dots.json'}",
        f"frames_root={tmp_path}",
        f"store={tmp_path / 'store'}",
    ]
    status, errors, warnings, _ = _run_main(data_prep.main, [*argv, "val_fraction=0.5", "workers=1"], caplog, capsys)
    assert status == 0, errors
    assert any("2 video(s) have frames under 16 px" in w and "1x1" in w for w in warnings), warnings


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_an_empty_split_predicts_nothing_with_a_warning(
    in_world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*BASE["data-prep"], "val_fraction=0", f"store={tmp_path}"]
    status, errors, _, out = _run_main(data_prep.main, argv, caplog, capsys)
    assert status == 0, errors
    dataset = json.loads(out)["dataset_uri"]
    argv = [_fill(a, in_world) for a in PREDICT_BASE] + [f"data.uri={dataset}", f"output.store={tmp_path}"]
    status, errors, warnings, out = _run_main(predict.main, argv, caplog, capsys)
    assert status == 0, errors
    assert any("holds no videos" in w for w in warnings), warnings
    assert json.loads((Path(json.loads(out)["predictions_uri"]) / PREDICTION_FILES["video"]).read_text()) == []


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_an_inline_sweep_longer_than_a_file_name_compiles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = json.dumps([{"lr": round(1e-4 * (1 + i / 10), 8), "max_steps": 100 + i} for i in range(12)])
    assert len(spec) > 255
    status, errors, _, out = _run_main(
        cli.main, ["compile", "--output", str(tmp_path / "sweep.yaml"), "--sweep", spec], caplog, capsys
    )
    assert status == 0, errors
    assert (tmp_path / "sweep.yaml").is_file() and json.loads(out)["pipeline"] == str(tmp_path / "sweep.yaml")


def test_run_local_keeps_kfp_local_under_sam3pipe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.local import default_pipeline_root

    monkeypatch.setenv("SAM3PIPE_HOME", str(tmp_path / "home"))
    assert cli.parse_args(["run", "--local"]).pipeline_root is None
    assert cli.parse_args(["sweep", "--local", "--spec", "{}"]).pipeline_root is None
    assert default_pipeline_root() == tmp_path / "home" / "kfp-local"


def test_out_of_memory_names_what_was_being_worked_on(caplog: pytest.LogCaptureFixture) -> None:
    from components.runner import run_cli
    from sam3_core.errors import working_on

    def execute(argv: list[str]) -> dict[str, Any]:
        with working_on("s3://bucket/huge/val.json"):
            bytearray(2**62)  # a real MemoryError, raised before anything is allocated
        return {}

    caplog.set_level(logging.ERROR)
    assert run_cli(execute, []) == 2
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "out of memory while working on s3://bucket/huge/val.json" in lines[0]


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_a_replay_the_server_refuses_in_part_ends_its_runs_and_keeps_only_what_was_refused(
    mlflow_tracking: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from sam3_core.errors import Sam3PipeError
    from sam3_core.mlflow_records import component_run, replay_unsent
    from sam3_core.mlflow_records.runs import TAG_PIPELINE_RUN_ID
    from sam3_core.mlflow_records.settings import MlflowConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # the server is away
    pipeline_run_id = f"outage-{os.getpid()}"
    cfg = MlflowConfig(
        pipeline_run_id=pipeline_run_id,
        connect_timeout_s=1.0,
        retry_initial_s=0.1,
        retry_max_s=0.2,
        final_flush_timeout_s=2.0,
        system_metrics=False,
    )
    with component_run(cfg, "train", {"optim": {"lr": 0.1}}, output_uri=str(tmp_path)) as run:
        run.log_metrics({"train/loss": 1.0}, 1)
        run.register_model(str(tmp_path / "best.pt"))  # a checkpoint only this machine's disk holds
    unsent = tmp_path / "mlflow_unsent.jsonl"
    assert unsent.is_file()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_tracking.url)
    with pytest.raises(Sam3PipeError, match=r"refused 1 model registration .* runs ended"):
        replay_unsent(str(unsent))
    client = MlflowClient()
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    runs = client.search_runs([experiment.experiment_id], f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'")
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    assert any(r.data.metrics.get("train/loss") == 1.0 for r in runs)
    kinds = [json.loads(line).get("record", {}).get("kind") for line in unsent.read_text().splitlines()]
    assert kinds.count("register") == 1 and "metric" not in unsent.read_text()


@pytest.mark.timeout(SUBPROCESS_TIMEOUT_S)
def test_a_cache_folder_that_cannot_be_used_is_named_not_blamed_on_the_dataset(
    s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    small = SyntheticConfig(num_videos=2, frames_per_video=2, height=32, width=32, min_size=8, max_size=16)
    dataset = prepare_dataset(
        DataPrepConfig(source="synthetic", synthetic=small, store=f"{s3_bucket}/store", val_fraction=0.5)
    )
    (tmp_path / "a-file").write_text("not a folder\n")
    argv = [*TRAIN_BASE[1:], f"data.uri={dataset.uri}", f"data.cache_dir={tmp_path / 'a-file' / 'cache'}"]
    status, errors, _, _ = _run_main(train.main, [*argv, f"output.store={tmp_path / 'store'}"], caplog, capsys)
    assert status == 2 and len(errors) == 1
    assert "data.cache_dir" in errors[0] and "a-file" in errors[0]
    assert dataset.uri not in errors[0] and "data_prep" not in errors[0]
