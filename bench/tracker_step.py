"""Training step of the tracker stage on one accelerator: SAM2's 8-frame clips, the detector frozen.

For each prompt kind a clip can get (SAM2's draws: masks on the first frame; points with 7
corrective clicks on 2 frames, its most expensive case), one bf16-autocast training step of
`train.stage=tracker` (frozen detector features, the tracker forward over the clip, SAM2's loss,
backward, AdamW on the default `memory_decoder` preset) at batch 1 clip of 3 objects: seconds per
step and peak memory; then the largest batch (clips per step) that fits, found by doubling and
bisecting. Rows are built as training builds them (`build_video_clip_model`, `train_tracker_preset`).

Called by `bench.bench_gpu` (one table after the detector's); `python -m bench.tracker_step
--preset tiny --allow-cpu` runs the same code on CPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench.largest_batch import largest_batch
from sam3_core.config import load_config
from sam3_core.data.synthetic import track_from_masks
from sam3_core.data.tracker_clips import TrackerBatch, TrackerClipConfig, TrackerClipDataset, collate_tracker_clips
from sam3_core.data.ytvis import Category, Video, VideoDataset
from sam3_core.model.tracker_training import TrackingSettings, build_video_clip_model, prepare_tracker
from sam3_core.train.config import TrainConfig
from sam3_core.train.optim import build_optimizer
from sam3_core.train.stages import freeze_all, train_tracker_preset
from sam3_core.train.tracker_loss import TrackerLoss, TrackerLossConfig
from sam3_core.train.tracker_task import TrackerTask

# prompt kind -> the clip settings that draw it on every clip
PROMPTS = {
    "mask": {"point_prob": 0.0, "max_cond_frames": 1},
    "clicks": {"point_prob": 1.0, "box_prob": 0.0, "max_cond_frames": 2, "max_correct_frames": 2},
}
FRAMES = 8
OBJECTS = 3


@dataclass
class TrackerBench:
    preset: str = "full"
    allow_cpu: bool = False
    steps: int = 3
    warmup_steps: int = 1
    # largest batch tried (0: no search); None: 16 on CUDA, no search on CPU
    max_batch: int | None = None


def _clips(size: int, settings: dict[str, float], count: int) -> list:
    """`count` clips of FRAMES frames with OBJECTS moving squares, prompted as `settings` draws."""
    rng = np.random.default_rng(0)
    video = Video(1, size, size, tuple(f"{t:05d}" for t in range(FRAMES)))
    tracks = []
    for k in range(OBJECTS):
        masks = []
        for t in range(FRAMES):
            mask = np.zeros((size, size), dtype=bool)
            x = (size // 8) * (k + 1) + t * size // 64
            mask[size // 4 : size // 2, x : x + size // 8] = True
            masks.append(mask)
        tracks.append(track_from_masks(k + 1, 1, 1, masks))
    frames = {name: rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8) for name in video.file_names}
    cfg = TrackerClipConfig(frames_per_clip=FRAMES, max_objects=OBJECTS, **settings)
    dataset = VideoDataset([video], tracks, [Category(1, "object")])
    data = TrackerClipDataset(dataset, frames.__getitem__, cfg, size, seed=0)
    return [data[0] for _ in range(count)]


class _Step:
    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.model = build_video_clip_model(cfg.model, frozen_detector=True).to(device)
        prepare_tracker(self.model.tracker, TrackingSettings(), seed=0)
        freeze_all(self.model.detector)
        train_tracker_preset(self.model.detector, self.model.tracker, "memory_decoder")
        self.model.train()
        self.task = TrackerTask(TrackerLoss(TrackerLossConfig()), device)
        self.optimizer = build_optimizer(self.model, cfg.optim)

    def batch(self, prompts: str, batch_size: int) -> TrackerBatch:
        return self.task.to_device(
            collate_tracker_clips(_clips(self.cfg.model.image_size, PROMPTS[prompts], batch_size))
        )

    def __call__(self, batch: TrackerBatch) -> float:
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.task.losses(self.model, batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def fits(self, prompts: str, batch_size: int) -> bool:
        try:
            self(self.batch(prompts, batch_size))
            return True
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def run(bench: TrackerBench) -> None:
    if not torch.cuda.is_available() and not bench.allow_cpu:
        print("skipped: no CUDA device here (run `python -m bench gpu` on a GPU machine)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config("train", TrainConfig, [f"model={bench.preset}", "data.uri=unused"])
    limit = bench.max_batch if bench.max_batch is not None else (16 if device.type == "cuda" else 0)
    step = _Step(cfg, device)
    trainable = sum(p.numel() for p in step.model.parameters() if p.requires_grad) / 1e6
    print(
        f"tracker stage, preset {bench.preset}, {cfg.model.image_size} px, {FRAMES}-frame clips of {OBJECTS} objects, "
        f"detector frozen, preset memory_decoder ({trainable:.1f}M trainable), median of {bench.steps} steps at batch 1"
    )
    print(f"{'prompts':>8} {'s/step':>8} {'peak GiB':>9} {'max batch':>10}")
    for prompts in PROMPTS:
        batch = step.batch(prompts, 1)
        for _ in range(bench.warmup_steps):
            step(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(step(batch) for _ in range(bench.steps))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        largest = str(largest_batch(functools.partial(step.fits, prompts), limit)) if limit else "-"
        print(f"{prompts:>8} {seconds:>8.3f} {peak:>9.2f} {largest:>10}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch tried (0: no search)")
    args = parser.parse_args()
    run(TrackerBench(args.preset, args.allow_cpu, args.steps, max_batch=args.max_batch))
