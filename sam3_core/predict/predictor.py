"""Predict: a checkpoint + a published dataset -> COCO frame results and YTVIS video results.

Frames of each video are spread over ranks by `ChunkedVideoDetector`; every rank then holds all
of a video's outputs, and the video's owner rank (video index mod world size) post-processes
them: COCO results per frame and masklets linked across frames. `PredictionDumper` gathers the
owners' parts to rank 0, which writes `coco_predictions_bbox.json`, `coco_predictions_segm.json`
and `video_predictions.json` under the output URI.

`model.uri` may name a registry entry (`models:/<name>@candidate`); it is resolved to its
checkpoint first, and the predictions folder is named after that checkpoint. Rank 0 also draws a
few frames of the first video with their predicted masks, for a reviewer to look at in MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam3_core import comm, storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.data.datapoints import frame_to_tensor
from sam3_core.data.frames import FrameReader
from sam3_core.data.ytvis import Video
from sam3_core.errors import ConfigError, InputError
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import load_model_weights
from sam3_core.model.chunked_detection import (
    ChunkedVideoDetector,
    DetectionConfig,
    frame_detector,
)
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.predict.association import AssociationConfig, associate
from sam3_core.predict.dumper import DumperConfig, PredictionDumper
from sam3_core.predict.postprocess import (
    FrameDetections,
    PostprocessConfig,
    coco_bbox_results,
    coco_segm_results,
    frame_detections,
)
from sam3_core.tracking import draw_masks, resolve_model_uri
from sam3_core.tracking.settings import TrackingConfig

log = logging.getLogger(__name__)


@dataclass
class PredictDataConfig:
    uri: str = "???"
    split: str = "val"
    cache_dir: str | None = None


@dataclass
class PredictOutputConfig:
    store: str = ".sam3pipe/store"
    # folder for the three prediction files; empty: <store>/predictions/<name derived from inputs>
    uri: str = ""


@dataclass
class PreviewConfig:
    """The frames drawn with their predicted masks: evenly spaced over the first video of the split."""

    # how many frames (0: none)
    frames: int = 3
    # masks drawn per frame: the best-scoring ones, at most this many, scoring at least min_score
    max_masks: int = 5
    min_score: float = 0.3

    def __post_init__(self) -> None:
        if self.frames < 0 or self.max_masks < 0:
            raise ConfigError(f"preview.frames and preview.max_masks must be >= 0, got {self.frames}, {self.max_masks}")


@dataclass
class PredictConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: PredictDataConfig = field(default_factory=PredictDataConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    association: AssociationConfig = field(default_factory=AssociationConfig)
    dumper: DumperConfig = field(default_factory=DumperConfig)
    output: PredictOutputConfig = field(default_factory=PredictOutputConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class PredictResult:
    predictions_uri: str
    # `video<id>_frame<index>` -> that frame with its predicted masks drawn; filled on rank 0 only
    previews: dict[str, Image.Image] = field(default_factory=dict)


def with_resolved_model(cfg: PredictConfig) -> PredictConfig:
    """The config with `model.uri` naming a checkpoint (a `models:/` registry URI looked up)."""
    if not cfg.model.uri:
        raise InputError("predict config", "model.uri", "no checkpoint given; pass model.uri=<checkpoint URI>")
    return replace(cfg, model=replace(cfg.model, uri=resolve_model_uri(cfg.model.uri)))


def output_uri_for(cfg: PredictConfig) -> str:
    if cfg.output.uri:
        return cfg.output.uri
    key = json.dumps([cfg.model.uri, cfg.model.preset, cfg.data.uri, cfg.data.split], sort_keys=True)
    return storage.join(cfg.output.store, "predictions", "pred-" + hashlib.sha256(key.encode()).hexdigest()[:12])


def _frame_image_ids(reader: FrameReader, split: str) -> dict[tuple[int, int], int]:
    rel = f"{split}_frames_coco.json"
    if rel not in reader.manifest["files"]:
        raise InputError(reader.dataset_uri, rel, f"no frame-level COCO file for split {split!r}; predict the 'val' split")
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


def predict(cfg: PredictConfig) -> PredictResult:
    """Run prediction on every video of the split; returns the predictions folder and the previews."""
    env = comm.init_process_group()
    device = comm.device()
    cfg = with_resolved_model(cfg)
    model = VideoClipDetector(build_detector(cfg.model))
    load_model_weights(model, cfg.model.uri)
    model.to(device).eval()

    reader = FrameReader(cfg.data.uri, cfg.data.cache_dir)
    dataset = reader.dataset(cfg.data.split)
    image_ids = _frame_image_ids(reader, cfg.data.split)
    prompts = [c.name for c in dataset.categories]
    category_ids = [c.id for c in dataset.categories]
    dumper = PredictionDumper(cfg.dumper)
    previews: dict[str, Image.Image] = {}

    for index, video in enumerate(tqdm(dataset.videos, desc="predict", unit="video", disable=not env.is_main)):
        def image_for(frame: int, names: tuple[str, ...] = video.file_names) -> torch.Tensor:
            return frame_to_tensor(np.array(reader.image(names[frame])), cfg.model.image_size)

        detector = ChunkedVideoDetector(frame_detector(model, prompts, image_for), cfg.detection)
        owner = index % env.world_size == env.rank
        by_frame = {}
        for frame, outputs in detector.run(video.length):
            if owner:
                by_frame[frame] = frame_detections(
                    {k: v.float().cpu() for k, v in outputs.items()},
                    category_ids,
                    image_ids[(video.id, frame)],
                    (video.height, video.width),
                    cfg.postprocess,
                )
        if owner:
            frames = [by_frame[f] for f in sorted(by_frame)]
            dumper.add("bbox", coco_bbox_results(frames))
            dumper.add("segm", coco_segm_results(frames))
            dumper.add_video(associate(frames, video.id, cfg.association))
        if index == 0 and env.is_main:
            previews = _previews(reader, video, by_frame, dict(zip(category_ids, prompts)), cfg.preview)

    out_uri = output_uri_for(cfg)
    dumper.dump(out_uri)
    comm.barrier()
    if env.is_main:
        log.info("predictions written to %s (%s)", out_uri, ", ".join(PREDICTION_FILES.values()))
    return PredictResult(out_uri, previews)
