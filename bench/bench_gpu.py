"""Training step of a preset on one accelerator: full fine-tuning vs a frozen vision backbone vs LoRA.

For clips of 1, 2 and 4 frames and each mode, one bf16-autocast training step (forward, sam3's
loss, backward, AdamW on the trainable parameters) at batch 1: seconds per step and peak memory;
then the largest batch (clips per step) that fits, found by doubling and bisecting until the
accelerator runs out of memory. The modes are built as training builds them: `model.freeze` of
the vision backbone, and `model.lora.rank` adapters on the default targets (everything else frozen).

`python -m bench gpu` on a CUDA machine runs the `full` preset at 1008 px, then the tracker stage's
step on SAM2's 8-frame clips (`bench.tracker_step`). Without CUDA it says so
and returns; `python -m bench.bench_gpu --preset tiny --allow-cpu` exercises the same code on CPU
(full precision there, and no batch search unless `--max-batch` is given).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import tracker_step
from sam3_core.config import load_config
from sam3_core.data.datapoints import FrameObject, Prompt, collate_clips, make_datapoint
from sam3_core.model import lora
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.config import LoraConfig
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from sam3_core.train.loss import build_loss
from sam3_core.train.optim import build_optimizer

VISION = "backbone.vision_backbone"
MODES = ("full", "frozen", "lora")
FRAMES = (1, 2, 4)


@dataclass
class GpuBench:
    preset: str = "full"
    allow_cpu: bool = False
    steps: int = 3
    warmup_steps: int = 2
    lora_rank: int = 16
    # largest batch tried (0: no search); None: 64 on CUDA, no search on CPU
    max_batch: int | None = None


def _clip(frames: int, size: int, seed: int = 0) -> object:
    rng = np.random.default_rng(seed)
    images, objects = [], []
    for t in range(frames):
        image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=bool)
        x = size // 8 + t * size // 32
        mask[size // 4 : size // 2, x : x + size // 4] = True
        images.append(image)
        objects.append([FrameObject(0, 1, (float(x), size / 4, size / 4, size / 4), mask)])
    return make_datapoint(images, objects, [Prompt(1, "red square"), Prompt(2, "blue circle")], size)


def _model(cfg: TrainConfig, mode: str, rank: int, device: torch.device) -> VideoClipDetector:
    model = VideoClipDetector(build_detector(cfg.model))
    if mode == "frozen":
        freeze(model.detector, [VISION])
    elif mode == "lora":
        lora.add_adapters(model.detector, LoraConfig(rank=rank))
    return model.to(device).train()


class _Step:
    """One training step of `model` on a batch of `batch_size` clips of `frames` frames."""

    def __init__(self, cfg: TrainConfig, model: VideoClipDetector, device: torch.device) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        self.loss_fn = build_loss(cfg.loss, cfg.model.num_queries, with_masks=True)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.amp = device.type == "cuda"

    def batch(self, frames: int, batch_size: int) -> object:
        batch = collate_clips([_clip(frames, self.cfg.model.image_size, seed) for seed in range(batch_size)])
        if self.device.type == "cuda":
            from sam3.model.utils.misc import copy_data_to_device

            batch = copy_data_to_device(batch, self.device)
        return batch

    def __call__(self, batch: object) -> float:
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(batch)
            targets = [self.model.detector.back_convert(t) for t in batch.find_targets]
            loss = self.loss_fn(out, targets)["core_loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def fits(self, frames: int, batch_size: int) -> bool:
        """Whether one step at `batch_size` runs without exhausting the accelerator's memory."""
        try:
            self(self.batch(frames, batch_size))
            return True
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            return False
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _largest_batch(step: _Step, frames: int, limit: int) -> int:
    """The largest batch in [1, limit] that fits: doubling, then bisecting the last gap."""
    fits, too_big = 0, limit + 1
    size = 1
    while size <= limit and step.fits(frames, size):
        fits, size = size, size * 2
    too_big = min(too_big, size)
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        if step.fits(frames, middle):
            fits = middle
        else:
            too_big = middle
    return fits


def _measure(step: _Step, frames: int, bench: GpuBench) -> tuple[float, float]:
    batch = step.batch(frames, 1)
    for _ in range(bench.warmup_steps):
        step(batch)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    seconds = statistics.median(step(batch) for _ in range(bench.steps))
    peak = torch.cuda.max_memory_allocated(step.device) / 2**30 if step.device.type == "cuda" else float("nan")
    return seconds, peak


def run(bench: GpuBench) -> None:
    if not torch.cuda.is_available() and not bench.allow_cpu:
        print("skipped: no CUDA device here (run `python -m bench gpu` on a GPU machine)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config("train", TrainConfig, [f"model={bench.preset}", "data.uri=unused"])
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (full precision)"
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else float("nan")
    limit = bench.max_batch if bench.max_batch is not None else (64 if device.type == "cuda" else 0)
    print(
        f"preset {bench.preset}, {cfg.model.image_size} px, bf16 autocast={device.type == 'cuda'}, device {name} "
        f"({total_gib:.0f} GiB), LoRA rank {bench.lora_rank}, median of {bench.steps} steps at batch 1, "
        f"torch {torch.__version__}"
    )
    print(f"{'mode':>7} {'trainable M':>12} {'frames':>6} {'s/step':>8} {'peak GiB':>9} {'max batch':>10}")
    for mode in MODES:
        model = _model(cfg, mode, bench.lora_rank, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        step = _Step(cfg, model, device)
        for frames in FRAMES:
            seconds, peak = _measure(step, frames, bench)
            largest = str(_largest_batch(step, frames, limit)) if limit else "-"
            print(f"{mode:>7} {trainable:>12.1f} {frames:>6} {seconds:>8.3f} {peak:>9.2f} {largest:>10}", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    run(GpuBench())
    tracker_step.run(tracker_step.TrackerBench())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full")
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch tried (0: no search)")
    args = parser.parse_args()
    run(GpuBench(args.preset, args.allow_cpu, args.steps, lora_rank=args.lora_rank, max_batch=args.max_batch))
