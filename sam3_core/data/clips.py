"""Clip sampling: which frames of which video, which prompts, for every training item.

Items are fixed anchors (video, start frame) so a DistributedSampler can cover every clip; the
random choices of an item (frame stride, time reversal, negative prompts, the augmentation view)
come from a generator seeded by (seed, epoch, index), so a clip is the same on any rank, worker or
rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch.utils.data

from sam3_core.config_checks import check_bool, check_float, check_int, fail
from sam3_core.data.augment import AugmentConfig, augment_clip
from sam3_core.data.datapoints import FrameObject, Prompt, make_datapoint
from sam3_core.data.ytvis import Track, VideoDataset, rle_to_mask
from sam3_core.errors import ConfigError


@dataclass
class ClipConfig:
    frames_per_clip: int = 2
    # frame stride drawn uniformly from [stride_min, stride_max] per training clip
    stride_min: int = 1
    stride_max: int = 2
    # probability of presenting a training clip backwards in time
    reverse_prob: float = 0.5
    # prompts for categories absent from the clip (the detector must say "none")
    num_negatives: int = 1
    # cap on prompts per clip; positives first
    max_prompts: int = 8
    with_masks: bool = True
    # geometric augmentation of training clips (one random view per clip)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("frames_per_clip", "stride_min", "max_prompts"):
            check_int(f"data.clips.{name}", getattr(self, name), 1)
        check_int("data.clips.stride_max", self.stride_max)
        if self.stride_max < self.stride_min:
            fail("data.clips.stride_max", self.stride_max, f">= data.clips.stride_min ({self.stride_min})")
        check_int("data.clips.num_negatives", self.num_negatives, 0)
        check_float("data.clips.reverse_prob", self.reverse_prob, 0.0, 1.0)
        check_bool("data.clips.with_masks", self.with_masks)


@dataclass(frozen=True)
class ClipRef:
    video_id: int
    start: int


def enumerate_clips(dataset: VideoDataset, frames_per_clip: int) -> list[ClipRef]:
    """Non-overlapping anchors covering every frame of every video (the last one flush to the end)."""
    refs = []
    for video in dataset.videos:
        starts = list(range(0, max(video.length - frames_per_clip, 0) + 1, frames_per_clip))
        if starts[-1] + frames_per_clip < video.length:
            starts.append(video.length - frames_per_clip)
        refs.extend(ClipRef(video.id, s) for s in starts)
    return refs


def check_clip_length(dataset: VideoDataset, frames_per_clip: int) -> None:
    """A clip longer than every video could only repeat frames; say so instead of training on copies.

    Videos shorter than the clip (when some other video is long enough) give clips whose last
    frame repeats, see `clip_frame_indices`.
    """
    if not dataset.videos:
        raise ConfigError("data.uri: the dataset split has no videos to sample clips from")
    longest = max(video.length for video in dataset.videos)
    if frames_per_clip > longest:
        raise ConfigError(
            f"data.clips.frames_per_clip={frames_per_clip} is longer than every video of the dataset "
            f"({len(dataset.videos)} videos, the longest has {longest} frames); use at most {longest}"
        )


def clip_frame_indices(start: int, length: int, frames: int, stride: int) -> list[int]:
    """`frames` indices from `start` at `stride`, shifted back (and stride shrunk) to fit the video."""
    stride = max(1, min(stride, (length - 1) // max(frames - 1, 1))) if frames > 1 else 1
    span = (frames - 1) * stride
    first = max(0, min(start, length - 1 - span))
    return [min(first + k * stride, length - 1) for k in range(frames)]


def _frame_objects(tracks: list[Track], frame: int, with_masks: bool) -> list[FrameObject]:
    objects = []
    for track in tracks:
        box = track.bboxes[frame]
        if box is None or box[2] <= 0 or box[3] <= 0:
            continue
        segmentation = track.segmentations[frame]
        mask = rle_to_mask(segmentation) if with_masks and segmentation is not None else None
        objects.append(FrameObject(track.id, track.category_id, tuple(box), mask))
    return objects


class ClipDataset(torch.utils.data.Dataset):
    """sam3 `Datapoint`s of clips; `train=False` gives fixed clips (stride 1, forward, no randomness)."""

    def __init__(
        self,
        dataset: VideoDataset,
        load_frame: Callable[[str], np.ndarray],
        cfg: ClipConfig,
        image_size: int,
        seed: int,
        train: bool = True,
    ) -> None:
        self.dataset, self.load_frame, self.cfg = dataset, load_frame, cfg
        self.image_size, self.seed, self.train = image_size, seed, train
        check_clip_length(dataset, cfg.frames_per_clip)
        self.refs = enumerate_clips(dataset, cfg.frames_per_clip)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.refs)

    def _prompts(
        self, tracks: list[Track], frames: list[int], rng: np.random.Generator, known_absent: tuple[int, ...] = ()
    ) -> list[Prompt]:
        """Positives first, then the video's known-absent phrases (SA-Co negatives), then sampled absent ones."""
        present = sorted({t.category_id for t in tracks if any(t.bboxes[f] is not None for f in frames)})
        # a training clip draws its share of a long negative list anew each epoch; no draw without one
        listed = [c for c in known_absent if c not in present]
        if self.train and len(listed) > 1:
            listed = rng.permutation(listed).tolist()
        absent = [c.id for c in self.dataset.categories if c.id not in present and c.id not in listed]
        n_neg = min(self.cfg.num_negatives, len(absent))
        negatives = (
            sorted(rng.choice(absent, size=n_neg, replace=False).tolist()) if self.train and n_neg else absent[:n_neg]
        )
        chosen = (present + listed + negatives)[: self.cfg.max_prompts]
        return [Prompt(c, self.dataset.category(c).name) for c in chosen]

    def __getitem__(self, index: int):
        ref = self.refs[index]
        video = self.dataset.video(ref.video_id)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        stride = int(rng.integers(self.cfg.stride_min, self.cfg.stride_max + 1)) if self.train else 1
        frames = clip_frame_indices(ref.start, video.length, self.cfg.frames_per_clip, stride)
        if self.train and rng.random() < self.cfg.reverse_prob:
            frames.reverse()
        tracks = self.dataset.tracks_of(video.id)
        prompts = self._prompts(tracks, frames, rng, video.negative_category_ids)
        pixels = [self.load_frame(video.file_names[f]) for f in frames]
        objects = [_frame_objects(tracks, f, self.cfg.with_masks) for f in frames]
        if self.train and self.cfg.augment.enabled:
            pixels, objects = augment_clip(pixels, objects, self.cfg.augment, rng)
        return make_datapoint(frames=pixels, objects=objects, prompts=prompts, image_size=self.image_size)
