"""Clips for training SAM3's tracker: frames, per-object masks kept across frames, and how each object is prompted.

The detector's clips (`sam3_core.data.clips`) ask noun phrases on every frame; the tracker is
given *objects*: on a conditioning frame it sees a mask, a box or a point of each object, and
must follow those objects through the clip from memory. This follows SAM2's published training
design (``training/model/sam2.py``, ``training/dataset/vos_sampler.py`` and the MOSE fine-tuning
config), with its defaults:

- a clip is ``frames_per_clip`` (8) consecutive frames (stride drawn in [stride_min, stride_max]),
  starting on a frame where some object is visible; up to ``max_objects`` (3) objects visible on
  that first frame are drawn, and keep their identity (their track) over the whole clip;
- 1 to ``max_cond_frames`` (2) conditioning frames: the first frame and others drawn from the clip;
- with ``point_prob`` (0.5) the objects are prompted with points, else with their masks; with
  points, each conditioning frame gets a noisy box with ``box_prob`` (0.5), else one point drawn
  uniformly from the object's mask (a negative point anywhere when the object is not visible);
- with points, corrective clicks go to ``max_correct_frames`` (2) frames at most: the conditioning
  frames and frames drawn from the rest; each such frame gets ``correction_points`` (7) clicks,
  each from the error region of the prediction so far, or with ``gt_click_prob`` (0.1) from the
  ground-truth mask (which of the two is drawn here; where the click falls is drawn in the
  forward pass from a generator seeded by the clip's ``seed``, since it depends on the prediction).

Every random choice of an item comes from a generator seeded by (seed, epoch, index), as for the
detector's clips: a clip is the same on any rank, worker or rerun, and a resumed run sees the same
prompts. Validation clips (``train=False``) are fixed: stride 1, forwards, the first frame's masks
as the only prompt (SAM2's semi-supervised evaluation setting), no corrections.

Every source works unchanged: they all publish tracks (an object's mask on every frame, null
where it is not visible), which is what this reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.utils.data

from sam3_core.config_checks import check_float, check_int, fail
from sam3_core.data.augment import AugmentConfig, augment_clip
from sam3_core.data.clips import check_clip_length, clip_frame_indices
from sam3_core.data.datapoints import FrameObject, frame_to_tensor, resize_mask
from sam3_core.data.ytvis import Track, Video, VideoDataset, rle_to_mask
from sam3_core.errors import ConfigError

PROMPT_KINDS = ("mask", "box", "point")
# SAM's box noise: each corner moves by up to this fraction of the box side, at most BOX_NOISE_MAX_PX pixels
BOX_NOISE = 0.1
BOX_NOISE_MAX_PX = 20.0
# SAM's point labels: negative, positive, box top-left, box bottom-right
NEGATIVE, POSITIVE, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3


@dataclass
class TrackerClipConfig:
    """Key `data.tracker_clips`: the clips and prompts of the tracker stage (SAM2's training defaults)."""

    frames_per_clip: int = 8
    stride_min: int = 1
    stride_max: int = 1
    # probability of presenting a training clip backwards in time (SAM2's MOSE config: 0)
    reverse_prob: float = 0.0
    # objects per clip, drawn among those visible on its first frame
    max_objects: int = 3
    # conditioning frames per clip: the first, plus up to max_cond_frames - 1 drawn ones (1..max drawn uniformly)
    max_cond_frames: int = 2
    # probability that a clip's objects are prompted with points or boxes instead of masks
    point_prob: float = 0.5
    # with points: probability that a conditioning frame gets a box rather than one point
    box_prob: float = 0.5
    # with points: frames receiving corrective clicks (the conditioning frames and drawn ones), at most
    max_correct_frames: int = 2
    # corrective clicks per corrected frame
    correction_points: int = 7
    # probability that a corrective click is drawn from the ground-truth mask instead of the error region
    gt_click_prob: float = 0.1
    # geometric augmentation, one random view per clip
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("frames_per_clip", "stride_min", "max_objects", "max_cond_frames", "max_correct_frames"):
            check_int(f"data.tracker_clips.{name}", getattr(self, name), 1)
        check_int("data.tracker_clips.stride_max", self.stride_max)
        if self.stride_max < self.stride_min:
            fail("data.tracker_clips.stride_max", self.stride_max, f">= stride_min ({self.stride_min})")
        if self.max_cond_frames > self.frames_per_clip:
            fail(
                "data.tracker_clips.max_cond_frames",
                self.max_cond_frames,
                f"<= frames_per_clip ({self.frames_per_clip})",
            )
        if not self.max_cond_frames <= self.max_correct_frames <= self.frames_per_clip:
            fail(
                "data.tracker_clips.max_correct_frames",
                self.max_correct_frames,
                f"in [max_cond_frames, frames_per_clip] = [{self.max_cond_frames}, {self.frames_per_clip}] "
                "(every conditioning frame prompted with points is corrected)",
            )
        check_int("data.tracker_clips.correction_points", self.correction_points, 0)
        for name in ("reverse_prob", "point_prob", "box_prob", "gt_click_prob"):
            check_float(f"data.tracker_clips.{name}", getattr(self, name), 0.0, 1.0)


@dataclass(frozen=True)
class ClipStart:
    video_id: int
    start: int


@dataclass
class PointPrompt:
    """Points in model-input pixels (x, y) per object: [N, P, 2] float and [N, P] int32 SAM labels."""

    coords: torch.Tensor
    labels: torch.Tensor


@dataclass
class TrackerClip:
    """One clip of N objects over T frames, resized to the model's input, and how its objects are prompted.

    Positions in ``cond_frames`` and ``correct_frames`` index the clip's frames (0 = first).
    ``prompts[i]`` is the prompt of conditioning frame ``cond_frames[i]``: None for the masks
    themselves, else points (one point, or a box's two corners). ``gt_clicks[i, k]``: whether the
    k-th corrective click on ``correct_frames[i]`` is drawn from the ground truth.
    """

    video_id: int
    frames: list[int]
    track_ids: list[int]
    images: torch.Tensor  # [T, 3, S, S] normalised
    masks: torch.Tensor  # [T, N, S, S] bool
    cond_frames: list[int]
    prompts: list[PointPrompt | None]
    correct_frames: list[int]
    gt_clicks: torch.Tensor  # [len(correct_frames), correction_points] bool
    seed: int

    @property
    def num_frames(self) -> int:
        return int(self.images.shape[0])


@dataclass
class TrackerBatch:
    """Clips of equal length; their frames stacked clip by clip for one backbone pass."""

    images: torch.Tensor  # [B * T, 3, S, S]
    clips: list[TrackerClip]


def collate_tracker_clips(clips: list[TrackerClip]) -> TrackerBatch:
    return TrackerBatch(images=torch.cat([clip.images for clip in clips]), clips=clips)


@dataclass
class JointBatch:
    """Stage joint: a detector clip batch (sam3's collated `BatchedDatapoint`) and a tracker clip batch."""

    detector: Any
    tracker: TrackerBatch


def _visible(track: Track, frame: int) -> bool:
    return track.bboxes[frame] is not None


def clip_starts(dataset: VideoDataset, frames_per_clip: int) -> list[ClipStart]:
    """Starts covering every video: a frame with a visible object, then the next such frame a clip length on.

    A start leaves room for a full clip at stride 1 where the video allows (the last one is
    flush with the end); a video shorter than a clip gives one start.
    """
    starts = []
    for video in dataset.videos:
        tracks = dataset.tracks_of(video.id)
        latest = max(video.length - frames_per_clip, 0)
        candidates = [f for f in range(latest + 1) if any(_visible(t, f) for t in tracks)]
        following = -1
        for frame in candidates:
            if frame >= following:
                starts.append(ClipStart(video.id, frame))
                following = frame + frames_per_clip
    return starts


def point_in_mask(mask: torch.Tensor, rng: np.random.Generator) -> tuple[tuple[float, float], int]:
    """A point (x, y) drawn uniformly from the mask, positive; a negative one anywhere when the mask is empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys):
        i = int(rng.integers(len(ys)))
        return (float(xs[i]), float(ys[i])), POSITIVE
    height, width = mask.shape
    return (float(rng.integers(width)), float(rng.integers(height))), NEGATIVE


def noisy_box(mask: torch.Tensor, rng: np.random.Generator) -> list[tuple[float, float]]:
    """The mask's tight box (pixel indices of its corners), each coordinate moved by SAM's box noise.

    An empty mask gives the box (0, 0, 0, 0), as SAM2's ``mask_to_box``.
    """
    height, width = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if not len(ys):
        return [(0.0, 0.0), (0.0, 0.0)]
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    dx, dy = min((x1 - x0) * BOX_NOISE, BOX_NOISE_MAX_PX), min((y1 - y0) * BOX_NOISE, BOX_NOISE_MAX_PX)
    noise = rng.uniform(-1.0, 1.0, size=4) * np.array([dx, dy, dx, dy])
    box = np.clip(np.array([x0, y0, x1, y1]) + noise, 0.0, [width - 1, height - 1, width - 1, height - 1])
    return [(float(box[0]), float(box[1])), (float(box[2]), float(box[3]))]


def prompt_of(kind: str, masks: torch.Tensor, rng: np.random.Generator) -> PointPrompt | None:
    """The prompt of every object ([N, S, S] masks) on one conditioning frame."""
    if kind == "mask":
        return None
    coords, labels = [], []
    for mask in masks:
        if kind == "box":
            coords.append(noisy_box(mask, rng))
            labels.append([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT])
        else:
            point, label = point_in_mask(mask, rng)
            coords.append([point])
            labels.append([label])
    return PointPrompt(torch.tensor(coords, dtype=torch.float32), torch.tensor(labels, dtype=torch.int32))


class TrackerClipDataset(torch.utils.data.Dataset):
    """`TrackerClip`s of a video dataset; `train=False` gives fixed clips prompted by first-frame masks."""

    def __init__(
        self,
        dataset: VideoDataset,
        load_frame: Callable[[str], np.ndarray],
        cfg: TrackerClipConfig,
        image_size: int,
        seed: int,
        train: bool = True,
    ) -> None:
        self.dataset, self.load_frame, self.cfg = dataset, load_frame, cfg
        self.image_size, self.seed, self.train = image_size, seed, train
        check_clip_length(dataset, cfg.frames_per_clip)
        self.starts = clip_starts(dataset, cfg.frames_per_clip)
        if not self.starts:
            raise ConfigError("data.uri: no frame of the dataset split shows an object to start a tracker clip on")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.starts)

    def _frames(self, video: Video, start: int, tracks: list[Track], rng: np.random.Generator) -> list[int]:
        cfg = self.cfg
        stride = int(rng.integers(cfg.stride_min, cfg.stride_max + 1)) if self.train else 1
        if cfg.frames_per_clip > 1:
            stride = max(1, min(stride, (video.length - 1 - start) // (cfg.frames_per_clip - 1)))
        frames = clip_frame_indices(start, video.length, cfg.frames_per_clip, stride)
        reverse = self.train and rng.random() < cfg.reverse_prob
        if reverse and any(_visible(t, frames[-1]) for t in tracks):
            frames.reverse()
        return frames

    def _plan(self, rng: np.random.Generator) -> tuple[list[int], list[str], list[int], int]:
        """Conditioning frames, their prompt kinds, corrected frames and corrective clicks per frame (SAM2's draws)."""
        cfg = self.cfg
        if not self.train:
            return [0], ["mask"], [], 0
        use_points = rng.random() < cfg.point_prob
        count = int(rng.integers(1, cfg.max_cond_frames, endpoint=True))
        others = rng.choice(np.arange(1, cfg.frames_per_clip), count - 1, replace=False).tolist()
        cond = [0, *others]
        kinds = [("box" if rng.random() < cfg.box_prob else "point") if use_points else "mask" for _ in cond]
        if not use_points:
            return cond, kinds, [], 0
        corrected = int(rng.integers(count, cfg.max_correct_frames, endpoint=True))
        rest = [t for t in range(cfg.frames_per_clip) if t not in cond]
        return cond, kinds, [*cond, *rng.choice(rest, corrected - count, replace=False).tolist()], cfg.correction_points

    def __getitem__(self, index: int) -> TrackerClip:
        ref = self.starts[index]
        video = self.dataset.video(ref.video_id)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tracks = self.dataset.tracks_of(video.id)
        frames = self._frames(video, ref.start, tracks, rng)
        visible = [t for t in tracks if _visible(t, frames[0])]
        if self.train and len(visible) > self.cfg.max_objects:
            chosen = set(rng.choice(len(visible), self.cfg.max_objects, replace=False).tolist())
            visible = [t for i, t in enumerate(visible) if i in chosen]
        visible = visible[: self.cfg.max_objects]
        pixels = [self.load_frame(video.file_names[f]) for f in frames]
        objects = [
            [
                FrameObject(t.id, t.category_id, tuple(t.bboxes[f]), rle_to_mask(t.segmentations[f]))
                for t in visible
                if _visible(t, f)
            ]
            for f in frames
        ]
        if self.train and self.cfg.augment.enabled:
            pixels, objects = augment_clip(pixels, objects, self.cfg.augment, rng)
        size = self.image_size
        masks = torch.zeros(len(frames), len(visible), size, size, dtype=torch.bool)
        slot = {t.id: k for k, t in enumerate(visible)}
        for t, frame_objects in enumerate(objects):
            for obj in frame_objects:
                if obj.mask is not None:
                    masks[t, slot[obj.track_id]] = resize_mask(obj.mask, size)
        cond, kinds, corrected, clicks = self._plan(rng)
        prompts = [prompt_of(kind, masks[t], rng) for t, kind in zip(cond, kinds)]
        gt_clicks = torch.from_numpy(rng.random((len(corrected), clicks)) < self.cfg.gt_click_prob)
        return TrackerClip(
            video_id=video.id,
            frames=frames,
            track_ids=[t.id for t in visible],
            images=torch.stack([frame_to_tensor(p, size) for p in pixels]),
            masks=masks,
            cond_frames=cond,
            prompts=prompts,
            correct_frames=corrected,
            gt_clicks=gt_clicks,
            seed=int(rng.integers(2**31 - 1)),
        )


class JointClipDataset(torch.utils.data.Dataset):
    """Stage joint: item i is detector clip i and tracker clip i, each cycled over the longer of the two."""

    def __init__(self, detector: torch.utils.data.Dataset, tracker: TrackerClipDataset) -> None:
        self.detector, self.tracker = detector, tracker

    def set_epoch(self, epoch: int) -> None:
        for part in (self.detector, self.tracker):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.detector), len(self.tracker))

    def __getitem__(self, index: int) -> tuple[Any, TrackerClip]:
        return self.detector[index % len(self.detector)], self.tracker[index % len(self.tracker)]


class JointCollate:
    """Picklable collate of `JointClipDataset` items: the detector's collate and `collate_tracker_clips`."""

    def __init__(self, detector: Callable[[list[Any]], Any]) -> None:
        self.detector = detector

    def __call__(self, items: list[tuple[Any, TrackerClip]]) -> JointBatch:
        return JointBatch(self.detector([d for d, _ in items]), collate_tracker_clips([t for _, t in items]))
