"""Seconds per step and peak memory of a preset on a GPU: clips of 1, 2 and 4 frames, bf16,
with and without a frozen vision backbone (the issue's H100-class benchmark).

`python -m bench gpu` on a CUDA machine runs the `full` preset at 1008 px. Without CUDA it says so
and returns; `python -m bench.bench_gpu --preset tiny --allow-cpu` exercises the same code on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sam3_core.config import load_config
from sam3_core.data.datapoints import FrameObject, Prompt, collate_clips, make_datapoint
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainJobConfig
from sam3_core.train.loss import build_loss
from sam3_core.train.optim import build_optimizer

VISION = "backbone.vision_backbone"


def _clip(frames: int, size: int) -> list:
    rng = np.random.default_rng(0)
    images, objects = [], []
    for t in range(frames):
        image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), dtype=bool)
        x = size // 8 + t * size // 32
        mask[size // 4 : size // 2, x : x + size // 4] = True
        images.append(image)
        objects.append([FrameObject(0, 1, (float(x), size / 4, size / 4, size / 4), mask)])
    return make_datapoint(images, objects, [Prompt(1, "red square"), Prompt(2, "blue circle")], size)


def _measure(cfg: TrainJobConfig, frames: int, frozen: bool, device: torch.device, steps: int) -> tuple[float, float]:
    model = VideoClipDetector(build_detector(cfg.model))
    if frozen:
        freeze(model.detector, [VISION])
    model.to(device).train()
    loss_fn = build_loss(cfg.loss, cfg.model.num_queries, with_masks=True)
    optimizer = build_optimizer(model, cfg.optim)
    batch = collate_clips([_clip(frames, cfg.model.image_size)])
    if device.type == "cuda":
        from sam3.model.utils.misc import copy_data_to_device

        batch = copy_data_to_device(batch, device)
        torch.cuda.reset_peak_memory_stats(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with amp:
            out = model(batch)
            loss = loss_fn(out, [model.detector.back_convert(t) for t in batch.find_targets])["core_loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    return statistics.median(times), peak


def run(preset: str, allow_cpu: bool, steps: int) -> None:
    if not torch.cuda.is_available() and not allow_cpu:
        print("skipped: no CUDA device here (run `python -m bench gpu` on a GPU machine)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config("train", TrainJobConfig, [f"model={preset}", "data.uri=unused"])
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"preset {preset}, {cfg.model.image_size} px, bf16 autocast={device.type == 'cuda'}, device {name}")
    print(f"{'frames':>6} {'vision':>8} {'s/step':>8} {'peak GiB':>9}")
    for frames in (1, 2, 4):
        for frozen in (False, True):
            seconds, peak = _measure(cfg, frames, frozen, device, steps)
            print(f"{frames:>6} {'frozen' if frozen else 'trained':>8} {seconds:>8.3f} {peak:>9.2f}")


def main() -> None:
    run("full", allow_cpu=False, steps=5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="full")
    parser.add_argument("--allow-cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    run(args.preset, args.allow_cpu, args.steps)
