"""Predict: a checkpoint + a published dataset -> COCO frame results and YTVIS video results.

Frames of each video are spread over ranks by `ChunkedVideoDetector`: each rank runs the
detector on its frames, one prompt batch at a time (`detection.prompt_batch`, bf16 autocast and
TF32 on GPU), keeps each frame's top-k detections as the batches come (`FrameTopK`) and sends
only those, masks already RLE-encoded, to the video's owner rank (video index mod world size),
which links them into masklets. So a rank's memory is one frame's prompt batch of raw outputs,
whatever the vocabulary, the video length or the number of ranks. `PredictionDumper` gathers the
owners' parts to rank 0, which writes `coco_predictions_bbox.json`, `coco_predictions_segm.json`
and `video_predictions.json` under the output URI.

`inference` chooses how masklets are made: `linked` (per-frame detections linked by IoU,
sam3_core.predict.association), `sam3_video` (SAM3's own detector + tracker video inference,
sam3_core.predict.sam3_video) or `vos` (SAM3's tracker from each ground-truth object's first-frame
mask, semi-supervised VOS, sam3_core.predict.vos; its masklets carry `gt_id`); all write the same
three files.

`model.uri` may name a registry entry (`models:/<name>@candidate`); it is resolved to its
checkpoint first. The predictions folder is keyed by every setting that shapes its files (the
checkpoint by the sha256 of its bytes), and records them in `predict_settings.json`: a folder
given as `output.uri` that holds predictions of other settings is never replaced without
`output.overwrite=true`. Rank 0 also draws a few frames of the first video with their predicted
masks, for a reviewer to look at in MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam3_core import comm, numerics, storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.config import flatten
from sam3_core.config_checks import MISSING, check_bool, check_choice, check_float, check_int, check_str, check_uri
from sam3_core.data.datapoints import frame_to_tensor
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import SPLITS
from sam3_core.data.ytvis import Video, VideoDataset
from sam3_core.errors import InputError
from sam3_core.mlflow_records import draw_masks, resolve_model_uri
from sam3_core.mlflow_records.settings import MlflowConfig
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import load_model_weights
from sam3_core.model.chunked_detection import (
    ChunkedVideoDetector,
    DetectionConfig,
    check_prompts_fit,
    frame_detector,
)
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker_training import build_video_clip_model, load_video_clip_weights
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.outputs import Output, check_earlier, check_outputs, claim
from sam3_core.predict import vos
from sam3_core.predict.association import AssociationConfig, associate
from sam3_core.predict.dumper import DumperConfig, PredictionDumper
from sam3_core.predict.postprocess import (
    FrameDetections,
    PostprocessConfig,
    batched_frame_detections,
    coco_bbox_results,
    coco_segm_results,
)
from sam3_core.predict.sam3_video import Sam3VideoConfig, Sam3VideoRunner

log = logging.getLogger(__name__)

# Written into every predictions folder: the settings that made its files (see prediction_settings).
SETTINGS_FILE = "predict_settings.json"
# Config sections whose values can change the prediction files ...
CONTENT_SECTIONS = ("inference", "model", "data", "detection", "postprocess", "association", "sam3_video", "dumper")
# ... except these, which change how they are computed or gathered, never what they hold.
CONTENT_NEUTRAL_KEYS = frozenset(
    {
        "data.cache_dir",
        "dumper.gather",
        "dumper.shared_dir",
        "dumper.store_uri",
        "dumper.timeout_s",
        "dumper.poll_interval_s",
    }
)


@dataclass
class PredictDataConfig:
    # URI of a dataset published by data_prep (`<store>/datasets/<id>`)
    uri: str = MISSING
    split: str = "val"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_uri("data.uri", self.uri, required=True)
        check_choice("data.split", self.split, SPLITS)
        check_str("data.cache_dir", self.cache_dir, optional=True)


@dataclass
class PredictOutputConfig:
    store: str = field(default_factory=storage.default_store)
    # folder for the three prediction files; empty: <store>/predictions/pred-<hash of every setting that
    # shapes them>, so predictions made with other settings never land on each other
    uri: str = ""
    # replace predictions that output.uri holds from other settings (refused otherwise)
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_uri("output.store", self.store, required=True)
        check_uri("output.uri", self.uri)
        check_bool("output.overwrite", self.overwrite)


@dataclass
class PreviewConfig:
    """The frames drawn with their predicted masks: evenly spaced over the first video of the split."""

    # how many frames (0: none)
    frames: int = 3
    # masks drawn per frame: the best-scoring ones, at most this many, scoring at least min_score
    max_masks: int = 5
    min_score: float = 0.3

    def __post_init__(self) -> None:
        check_int("preview.frames", self.frames, minimum=0)
        check_int("preview.max_masks", self.max_masks, minimum=0)
        check_float("preview.min_score", self.min_score, 0.0, 1.0)


# how masklets are made (CONTRACTS.md item 3), each mode a module of sam3_core.predict: linked (per-frame
# detections linked by IoU), sam3_video (SAM3's detector + tracker), vos (SAM3's tracker from each
# ground-truth object's first-frame mask: semi-supervised VOS)
INFERENCE_MODES = ("linked", "sam3_video", "vos")


@dataclass
class PredictConfig:
    # linked | sam3_video | vos (see INFERENCE_MODES)
    inference: str = "linked"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PredictDataConfig = field(default_factory=PredictDataConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    sam3_video: Sam3VideoConfig = field(default_factory=Sam3VideoConfig)
    dumper: DumperConfig = field(default_factory=DumperConfig)
    output: PredictOutputConfig = field(default_factory=PredictOutputConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # torch CPU threads per process; 0: as training's default (OMP_NUM_THREADS if set, else cores /
    # processes on this machine), so ranks under torchrun do not each take every core
    num_threads: int = 0

    def __post_init__(self) -> None:
        check_choice("inference", self.inference, INFERENCE_MODES)
        check_int("num_threads", self.num_threads, 0)


@dataclass
class PredictResult:
    predictions_uri: str
    # `video<id>_frame<index>` -> that frame with its predicted masks drawn; filled on rank 0 only
    previews: dict[str, Image.Image] = field(default_factory=dict)


def with_resolved_model(cfg: PredictConfig) -> PredictConfig:
    """The config with `model.uri` naming a checkpoint (a `models:/` registry URI looked up)."""
    if not cfg.model.uri:
        raise InputError("predict config", "model.uri", "no checkpoint given; pass model.uri=<checkpoint URI>")
    return replace(cfg, model=replace(cfg.model, uri=resolve_model_uri(cfg.model.uri, cfg=cfg.mlflow)))


@dataclass(frozen=True)
class LocalCheckpoint:
    """The checkpoint read once: its URI, a local copy of its bytes and their sha256."""

    uri: str
    path: Path
    sha256: str


@contextlib.contextmanager
def fetched_checkpoint(uri: str) -> Iterator[LocalCheckpoint]:
    """A private copy of the checkpoint for this run, so the weights used are the bytes hashed.

    `last.pt` is replaced while a training goes on; hashing and loading one copy keeps the
    predictions folder's key true to the weights that made them.
    """
    with tempfile.TemporaryDirectory(prefix="sam3pipe-predict-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        storage.download_file(uri, path)
        yield LocalCheckpoint(uri, path, storage.sha256_file(path))


def prediction_settings(cfg: PredictConfig, checkpoint_sha256: str) -> dict[str, Any]:
    """Every setting that shapes the prediction files, as dotted keys (the checkpoint by its sha256).

    New config keys count by default; only keys known to leave the files unchanged are left out.
    """
    settings = {
        key: value
        for key, value in flatten(cfg).items()
        if key.split(".", 1)[0] in CONTENT_SECTIONS and key not in CONTENT_NEUTRAL_KEYS
    }
    settings["model.sha256"] = checkpoint_sha256
    return settings


def settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def output_uri_for(cfg: PredictConfig, checkpoint_sha256: str) -> str:
    """`output.uri`, or `<store>/predictions/pred-<key>` keyed by everything that shapes the files."""
    if cfg.output.uri:
        return cfg.output.uri
    key = settings_key(prediction_settings(cfg, checkpoint_sha256))
    return storage.join(cfg.output.store, "predictions", "pred-" + key[:16])


def prepare_output(cfg: PredictConfig, checkpoint: LocalCheckpoint) -> str:
    """The predictions folder for this config and checkpoint, checked by the output guard.

    It must not be or hold an input (the dataset, the checkpoint), nor lie in a published dataset;
    predictions it holds from other settings are replaced only with `output.overwrite=true` (the
    same settings may write again: a retried step makes the same files).
    """
    out_uri = output_uri_for(cfg, checkpoint.sha256)
    output = Output(out_uri, "output.uri", folder=True)
    check_outputs([output], {"data.uri": cfg.data.uri, "model.uri": checkpoint.uri})
    check_earlier(
        output,
        storage.join(out_uri, SETTINGS_FILE),
        prediction_settings(cfg, checkpoint.sha256),
        cfg.output.overwrite,
        "output.overwrite",
        lambda: any(storage.exists(storage.join(out_uri, name)) for name in PREDICTION_FILES.values()),
    )
    return out_uri


def _frame_image_ids(reader: FrameReader, split: str) -> dict[tuple[int, int], int]:
    rel = f"{split}_frames_coco.json"
    if rel not in reader.manifest["files"]:
        raise InputError(
            reader.dataset_uri, rel, f"no frame-level COCO file for split {split!r}; predict the 'val' split"
        )
    coco = json.loads(reader.local_path(rel).read_text())
    return {(int(im["video_id"]), int(im["frame_index"])): int(im["id"]) for im in coco["images"]}


def preview_frames(length: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame of a video."""
    return sorted({int(i) for i in np.linspace(0, length - 1, min(count, length)).round()})


def draw_preview(
    image: Image.Image, detections: FrameDetections, names: dict[int, str], cfg: PreviewConfig
) -> Image.Image:
    """The frame with its best masks tinted and labelled `<category> <score>`."""
    rles = detections.rles or []
    kept = [i for i in range(len(rles)) if detections.scores[i] >= cfg.min_score][: cfg.max_masks]
    masks = [mask_utils.decode(rles[i]) for i in kept]
    labels = [f"{names[detections.category_ids[i]]} {detections.scores[i]:.2f}" for i in kept]
    return draw_masks(image, masks, labels)


def _previews(
    reader: FrameReader, video: Video, by_frame: dict[int, FrameDetections], names: dict[int, str], cfg: PreviewConfig
) -> dict[str, Image.Image]:
    return {
        f"video{video.id}_frame{frame:05d}": draw_preview(
            reader.image(video.file_names[frame]), by_frame[frame], names, cfg
        )
        for frame in preview_frames(video.length, cfg.frames)
    }


def _load_weights(model: torch.nn.Module, checkpoint: LocalCheckpoint) -> None:
    """Weights from the local copy; errors name the checkpoint's URI, not the copy."""
    try:
        load_model_weights(model, str(checkpoint.path))
    except InputError as exc:
        raise InputError(checkpoint.uri, exc.field, exc.message.replace(str(checkpoint.path), checkpoint.uri)) from exc


def _frame_detections(
    detect: Callable[[int], Iterator[dict[str, torch.Tensor]]],
    category_ids: list[int],
    image_ids: dict[tuple[int, int], int],
    video: Video,
    cfg: PostprocessConfig,
) -> Callable[[int], FrameDetections]:
    """A frame of `video` -> its kept detections, its prompt batches reduced as they come."""

    def detections(frame: int) -> FrameDetections:
        size = (video.height, video.width)
        return batched_frame_detections(detect(frame), category_ids, image_ids[(video.id, frame)], size, cfg)

    return detections


def predict(cfg: PredictConfig, checkpoint: LocalCheckpoint | None = None) -> PredictResult:
    """Run prediction on every video of the split; returns the predictions folder and the previews.

    `checkpoint`: the model's checkpoint already fetched (see `fetched_checkpoint`); else fetched here.
    """
    cfg = with_resolved_model(cfg)
    if checkpoint is None:
        with fetched_checkpoint(cfg.model.uri) as fetched:
            return predict(cfg, fetched)
    out_uri = prepare_output(cfg, checkpoint)
    threads = comm.set_num_threads(cfg.num_threads)
    env = comm.init_process_group()
    device = comm.device()
    log.info("rank %d/%d on %s, %d torch thread(s)", env.rank, env.world_size, device, threads)
    numerics.use_fast_matmul(device)
    reader = FrameReader(cfg.data.uri, cfg.data.cache_dir)
    dataset = reader.dataset(cfg.data.split)
    if cfg.inference != "vos":  # inference=vos prompts the tracker with masks, the detector sees no text prompt
        check_prompts_fit(
            len(dataset.categories),
            cfg.model,
            storage.join(cfg.data.uri, f"{cfg.data.split}.json"),
            device,
            cfg.detection.prompt_batch,
        )
    if not dataset.videos:
        log.warning(
            "the %s split of %s holds no videos: the predictions will be empty (a dataset prepared with "
            "val_fraction=0 has no val split; predict data.split=train, or prepare it with val_fraction > 0)",
            cfg.data.split,
            cfg.data.uri,
        )
    image_ids = _frame_image_ids(reader, cfg.data.split)
    dumper = PredictionDumper(cfg.dumper)
    if cfg.inference == "vos":
        previews = _predict_vos(cfg, checkpoint, reader, dataset, image_ids, dumper, device)
    elif cfg.inference == "sam3_video":
        previews = _predict_sam3_video(cfg, checkpoint, reader, dataset, image_ids, dumper, env, device)
    else:
        previews = _predict_linked(cfg, checkpoint, reader, dataset, image_ids, dumper, env, device)
    if env.is_main:
        # the settings go first: a folder is claimed for them before its files change
        settings = prediction_settings(cfg, checkpoint.sha256)
        claim(storage.join(out_uri, SETTINGS_FILE), settings, key=settings_key(settings))
    dumper.dump(out_uri)
    comm.barrier()
    if env.is_main:
        log.info("predictions written to %s (%s)", out_uri, ", ".join(PREDICTION_FILES.values()))
    return PredictResult(out_uri, previews)


def _dump_video(dumper: PredictionDumper, frames: Sequence[FrameDetections], masklets: Iterable[dict]) -> None:
    """One video's results, whichever inference made them: COCO boxes and masks per frame, its masklets."""
    dumper.add("bbox", coco_bbox_results(frames))
    dumper.add("segm", coco_segm_results(frames))
    dumper.add_video(masklets)


def _predict_vos(
    cfg: PredictConfig,
    checkpoint: LocalCheckpoint,
    reader: FrameReader,
    dataset: VideoDataset,
    image_ids: dict[tuple[int, int], int],
    dumper: PredictionDumper,
    device: torch.device,
) -> dict[str, Image.Image]:
    """inference=vos: each rank propagates its share of the videos (video index mod world size)."""
    model = build_video_clip_model(cfg.model)
    try:
        load_video_clip_weights(model, str(checkpoint.path))
    except InputError as exc:
        raise InputError(checkpoint.uri, exc.field, exc.message.replace(str(checkpoint.path), checkpoint.uri)) from exc
    model.to(device).eval()
    names = {c.id: c.name for c in dataset.categories}
    previews: dict[str, Image.Image] = {}
    mine = [(i, v) for i, v in enumerate(dataset.videos) if i % comm.world_size() == comm.rank()]
    for index, video in tqdm(mine, desc="predict vos", unit="video", disable=not comm.is_main()):
        images = vos.frame_images(reader.image, video, cfg.model.image_size)
        propagation = vos.VideoPropagation(model, video, dataset.tracks_of(video.id), images)
        propagation.run()
        frames = propagation.frames(image_ids)
        _dump_video(dumper, frames, propagation.masklets())
        if index == 0:
            previews = _previews(reader, video, dict(enumerate(frames)), names, cfg.preview)
    return previews


def _predict_sam3_video(
    cfg: PredictConfig,
    checkpoint: LocalCheckpoint,
    reader: FrameReader,
    dataset: VideoDataset,
    image_ids: dict[tuple[int, int], int],
    dumper: PredictionDumper,
    env: comm.LaunchEnv,
    device: torch.device,
) -> dict[str, Image.Image]:
    """inference=sam3_video: SAM3's own video inference, every category a text prompt (sam3_core.predict.sam3_video)."""
    video_model = Sam3VideoRunner(cfg.model, cfg.sam3_video, str(checkpoint.path), device, checkpoint.uri)
    prompts = [c.name for c in dataset.categories]
    category_ids = [c.id for c in dataset.categories]
    previews: dict[str, Image.Image] = {}
    for index, video in enumerate(tqdm(dataset.videos, desc="predict", unit="video", disable=not env.is_main)):
        predicted = video_model.predict(index, video, reader.image, prompts, category_ids, image_ids)
        by_frame = dict(enumerate(predicted.frames)) if predicted else {}
        if predicted:
            _dump_video(dumper, predicted.frames, predicted.masklets)
        if index == 0 and env.is_main:
            previews = _previews(reader, video, by_frame, dict(zip(category_ids, prompts)), cfg.preview)
    return previews


def _predict_linked(
    cfg: PredictConfig,
    checkpoint: LocalCheckpoint,
    reader: FrameReader,
    dataset: VideoDataset,
    image_ids: dict[tuple[int, int], int],
    dumper: PredictionDumper,
    env: comm.LaunchEnv,
    device: torch.device,
) -> dict[str, Image.Image]:
    """inference=linked: per-frame detections (frames spread over ranks) linked into masklets by IoU."""
    model = VideoClipDetector(build_detector(cfg.model))
    _load_weights(model, checkpoint)
    model.to(device).eval()
    prompts = [c.name for c in dataset.categories]
    category_ids = [c.id for c in dataset.categories]
    previews: dict[str, Image.Image] = {}

    for index, video in enumerate(tqdm(dataset.videos, desc="predict", unit="video", disable=not env.is_main)):

        def image_for(frame: int, names: tuple[str, ...] = video.file_names) -> torch.Tensor:
            return frame_to_tensor(np.array(reader.image(names[frame])), cfg.model.image_size)

        detect = frame_detector(model, prompts, image_for, cfg.detection)
        owner = index % env.world_size
        chunked = ChunkedVideoDetector(
            _frame_detections(detect, category_ids, image_ids, video, cfg.postprocess), reverse=cfg.detection.reverse
        )
        by_frame = dict(chunked.run(video.length, owner=owner))
        if owner == env.rank:
            frames = [by_frame[f] for f in sorted(by_frame)]
            _dump_video(dumper, frames, associate(frames, video.id, cfg.association))
        if index == 0 and env.is_main:
            previews = _previews(reader, video, by_frame, dict(zip(category_ids, prompts)), cfg.preview)
    return previews
