"""A tiny, learnable video segmentation dataset: coloured shapes that move, bounce and occlude.

It exists so the whole pipeline (prep -> train -> predict -> evaluate) runs on a laptop CPU
in minutes with no download. Each category is a distinct (colour, shape) pair named by its
noun phrase ("red circle"); objects are drawn back to front, so an object below another loses
the covered pixels from its mask, and a fully covered object is annotated as not visible
(null) in that frame, exactly like real video annotations. Everything follows from the seed.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

from sam3_core.config_checks import check_float, check_int, fail
from sam3_core.data.ytvis import (
    Category,
    Track,
    Video,
    VideoDataset,
    mask_to_rle,
    rle_area,
    rle_bbox,
    to_json,
)
from sam3_core.errors import ConfigError

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 40),
    "magenta": (215, 50, 215),
    "cyan": (40, 215, 215),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
ANNOTATIONS_FILE = "annotations.json"


def _default_categories() -> list[str]:
    return ["red circle", "blue square", "green triangle", "yellow square"]


# frame side limit: a 4K frame; the model sees at most 1008 px, and drawing bigger frames takes minutes each
MAX_SIDE = 4096
# one video is rendered in memory at a time; it may use at most this share of the available memory
MEMORY_SHARE = 0.5
# float64 working arrays of one frame being drawn: pixel grid (2), distances (2), image, noise and
# their temporaries (about 4 x 3 channels)
_WORK_BYTES_PER_PIXEL = 8 * (2 + 2 + 4 * 3)


@dataclass
class SyntheticConfig:
    """What to generate; the defaults are the demo's data set, which also sets `distinct_categories`.

    Objects of 28-56 px in 128 px frames cover 2-4 of the tiny model's 8 x 8 image tokens: with
    16-40 px objects (mostly background tokens) the same training reached bbox_AP50 0.39 instead
    of 0.6 in 400 steps. 64 videos, each with its own background level, keep a model from
    recognising the video instead of its objects (as it did on 16).
    """

    num_videos: int = 64
    frames_per_video: int = 8
    height: int = 128
    width: int = 128
    min_objects: int = 1
    max_objects: int = 3
    # "<colour> <shape>" noun phrases; colours from COLORS, shapes from SHAPES
    categories: list[str] = field(default_factory=_default_categories)
    # every object of a video has a category of its own: no two objects a prompt finds look alike
    distinct_categories: bool = False
    # side of an object's bounding square, pixels
    min_size: int = 28
    max_size: int = 56
    # pixels per frame; every object moves at between half and all of this speed
    max_speed: float = 6.0
    # standard deviation of per-pixel Gaussian noise, as a fraction of the 0-255 range
    noise: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_videos", "frames_per_video", "min_objects", "min_size"):
            check_int(f"synthetic.{name}", getattr(self, name), 1)
        for name in ("height", "width"):
            # frames are drawn on the CPU
            check_int(f"synthetic.{name}", getattr(self, name), 1, MAX_SIDE)
        check_int("synthetic.seed", self.seed, 0, 2**32 - 1)
        check_int("synthetic.max_objects", self.max_objects)
        if self.max_objects < self.min_objects:
            fail("synthetic.max_objects", self.max_objects, f">= synthetic.min_objects ({self.min_objects})")
        check_int("synthetic.max_size", self.max_size)
        if not self.min_size <= self.max_size <= min(self.height, self.width):
            fail(
                "synthetic.max_size",
                self.max_size,
                f"in [min_size, min(height, width)] = [{self.min_size}, {min(self.height, self.width)}]",
            )
        check_float("synthetic.max_speed", self.max_speed, 0.0, max(self.height, self.width))
        # a fraction of the 0-255 range
        check_float("synthetic.noise", self.noise, 0.0, 1.0)
        if not self.categories:
            fail("synthetic.categories", self.categories, "at least one '<colour> <shape>' name")
        if len(set(self.categories)) != len(self.categories):
            fail("synthetic.categories", self.categories, "distinct names")
        for name in self.categories:
            parse_category(name)
        if self.distinct_categories and self.max_objects > len(self.categories):
            fail(
                "synthetic.max_objects",
                self.max_objects,
                f"<= the number of categories ({len(self.categories)}) with synthetic.distinct_categories=true",
            )


@dataclass(frozen=True)
class RenderedObject:
    """One object of a rendered video: its category and, per frame, its full and its visible mask."""

    category_id: int
    full_masks: list[np.ndarray]
    visible_masks: list[np.ndarray]


@dataclass(frozen=True)
class RenderedVideo:
    frames: list[np.ndarray]
    objects: list[RenderedObject]


def video_memory_bytes(cfg: SyntheticConfig) -> int:
    """Peak memory of rendering one video: its frames, a full and a visible mask per object and frame, work arrays."""
    pixels = cfg.height * cfg.width
    return cfg.frames_per_video * pixels * (3 + 2 * cfg.max_objects) + pixels * _WORK_BYTES_PER_PIXEL


def frames_disk_bytes(cfg: SyntheticConfig) -> int:
    """Disk the PNG frames take at most: noisy frames barely compress, so their raw size."""
    return cfg.num_videos * cfg.frames_per_video * cfg.height * cfg.width * 3


def check_config(cfg: SyntheticConfig, available_memory: int | None = None) -> None:
    """Reject a config whose single video does not fit in memory (values are checked when it is built).

    Videos are rendered one at a time, so memory bounds the frame size, frames per video and
    objects, not the number of videos (the disk does: see `generate`).
    """
    available = psutil.virtual_memory().available if available_memory is None else available_memory
    need = video_memory_bytes(cfg)
    if need > MEMORY_SHARE * available:
        raise ConfigError(
            f"config data_prep: synthetic.height x width x frames_per_video x max_objects = {cfg.height} x {cfg.width} "
            f"x {cfg.frames_per_video} x {cfg.max_objects} needs {need / 2**30:.1f} GiB to render one video, more than "
            f"half of the {available / 2**30:.1f} GiB available; lower them"
        )


def _check_disk(cfg: SyntheticConfig, out_dir: Path) -> None:
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = frames_disk_bytes(cfg)
    if need > free:
        raise ConfigError(
            f"config data_prep: synthetic.num_videos={cfg.num_videos}: {cfg.num_videos} x {cfg.frames_per_video} frames "
            f"of {cfg.height} x {cfg.width} need up to {need / 2**30:.1f} GiB, but {existing} has {free / 2**30:.1f} GiB "
            "free; lower num_videos or frames_per_video"
        )


def parse_category(name: str) -> tuple[tuple[int, int, int], str]:
    """'red circle' -> ((220, 40, 40), 'circle')."""
    parts = name.split()
    if len(parts) != 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
        raise ConfigError(
            f"config synthetic.categories: {name!r} is not '<colour> <shape>' with colour in "
            f"{sorted(COLORS)} and shape in {list(SHAPES)}"
        )
    return COLORS[parts[0]], parts[1]


def shape_mask(shape: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """Boolean mask of a shape whose bounding square of side `size` is centred at (cx, cy)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    half = size / 2.0
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= half**2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # apex up; the half-width grows from 0 at the top to `half` at the base
    return (dy <= half) & (np.abs(dx) <= (dy + half) / 2.0)


def composite(
    background: np.ndarray, layers: list[tuple[np.ndarray, tuple[int, int, int]]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint masks back to front (first = bottom); return the image and each layer's visible mask.

    A layer's visible mask is its mask minus everything painted above it, so annotations
    describe what the image shows.
    """
    image = background.copy()
    for mask, color in layers:
        image[mask] = color
    visible: list[np.ndarray] = []
    covered = np.zeros(background.shape[:2], dtype=bool)
    for mask, _ in reversed(layers):
        visible.append(mask & ~covered)
        covered |= mask
    return image, visible[::-1]


def render_video(cfg: SyntheticConfig, index: int) -> RenderedVideo:
    """Frames and masks of the `index`-th video; depends only on (cfg, index), not on other videos."""
    rng = np.random.default_rng([cfg.seed, index])
    h, w = cfg.height, cfg.width
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    if cfg.distinct_categories:
        category_ids = rng.choice(len(cfg.categories), size=count, replace=False)
    else:
        category_ids = rng.integers(0, len(cfg.categories), size=count)
    sizes = rng.uniform(cfg.min_size, cfg.max_size, size=count)
    centers = np.stack([rng.uniform(sizes / 2, w - sizes / 2), rng.uniform(sizes / 2, h - sizes / 2)], axis=1)
    angles = rng.uniform(0, 2 * np.pi, size=count)
    speeds = rng.uniform(cfg.max_speed / 2, cfg.max_speed, size=count)
    velocities = np.stack([np.cos(angles), np.sin(angles)], axis=1) * speeds[:, None]
    base = rng.uniform(20, 80)
    styles = [parse_category(cfg.categories[c]) for c in category_ids]
    frames: list[np.ndarray] = []
    full: list[list[np.ndarray]] = [[] for _ in range(count)]
    visible: list[list[np.ndarray]] = [[] for _ in range(count)]
    limits = np.array([w, h], dtype=np.float64)
    for _ in range(cfg.frames_per_video):
        masks = [shape_mask(styles[k][1], *centers[k], sizes[k], h, w) for k in range(count)]
        background = np.full((h, w, 3), base, dtype=np.float64)
        image, shown = composite(background, [(masks[k], styles[k][0]) for k in range(count)])
        image = image + rng.normal(0.0, cfg.noise * 255.0, size=image.shape)
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
        for k in range(count):
            full[k].append(masks[k])
            visible[k].append(shown[k])
        centers, velocities = _step(centers, velocities, sizes / 2, limits)
    objects = [
        RenderedObject(category_id=int(category_ids[k]) + 1, full_masks=full[k], visible_masks=visible[k])
        for k in range(count)
    ]
    return RenderedVideo(frames=frames, objects=objects)


def _step(
    centers: np.ndarray, velocities: np.ndarray, halves: np.ndarray, limits: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Move one frame; an object whose bounding square would leave the frame bounces off that edge."""
    centers = centers + velocities
    velocities = velocities.copy()
    low, high = halves[:, None], limits[None, :] - halves[:, None]
    below, above = centers < low, centers > high
    centers = np.where(below, 2 * low - centers, centers)
    centers = np.where(above, 2 * high - centers, centers)
    velocities[below | above] *= -1
    return np.clip(centers, low, high), velocities


def track_from_masks(track_id: int, video_id: int, category_id: int, masks: list[np.ndarray]) -> Track:
    """A track whose frames with an empty visible mask are null, as in real annotations."""
    rles = [mask_to_rle(m) if m.any() else None for m in masks]
    return Track(
        id=track_id,
        video_id=video_id,
        category_id=category_id,
        segmentations=tuple(rles),
        bboxes=tuple(rle_bbox(r) if r is not None else None for r in rles),
        areas=tuple(rle_area(r) if r is not None else None for r in rles),
    )


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> Path:
    """Write PNG frames under `out_dir/frames/` and return the annotation file (frames root = `out_dir`).

    Checks memory and disk first, so a config too big for this machine fails before anything is written.
    """
    out = Path(out_dir)
    check_config(cfg)
    _check_disk(cfg, out)
    videos: list[Video] = []
    tracks: list[Track] = []
    for index in tqdm(range(cfg.num_videos), desc="synthetic videos", unit="video"):
        video_id = index + 1
        rendered = render_video(cfg, index)
        names = []
        for t, frame in enumerate(rendered.frames):
            name = f"frames/{video_id:04d}/{t:05d}.png"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(out / name, format="PNG")
            names.append(name)
        videos.append(Video(id=video_id, width=cfg.width, height=cfg.height, file_names=tuple(names)))
        for obj in rendered.objects:
            tracks.append(track_from_masks(len(tracks) + 1, video_id, obj.category_id, obj.visible_masks))
    categories = [Category(id=i + 1, name=name) for i, name in enumerate(cfg.categories)]
    path = out / ANNOTATIONS_FILE
    path.write_text(json.dumps(to_json(VideoDataset(videos, tracks, categories)), separators=(",", ":")))
    logger.info("generated %d synthetic videos with %d tracks in %s", len(videos), len(tracks), out)
    return path
