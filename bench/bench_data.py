"""Data prep per core before vs after, end to end on 1 and 2 workers, and the training loader vs the model.

Data prep: a generated SA-Co/VEval-shaped video (146 frames at 720x1280, 33 masklets, 4,359
frame masks; `bench/saco_video.py`) resized to `resize_max_side=224`. "before" is format
version 1's path, kept verbatim below (Pillow float32 resize of the fully decoded mask; Pillow
frame resize saved as PNG), timed on a sample; "after" is `sam3_core.data.resample` on every
frame and mask, then `prepare_dataset` end to end (annotations, staging, hashing, publishing)
with 1 and 2 workers against the 5 s target.

Loader: clips/s of the training DataLoader (frames read through `FrameReader`, clips built and
collated) with 0, 1 and 2 workers, from a local store and from moto's S3 server over HTTP (a
cold cache, then warm), next to the clips/s the tiny model consumes in a training step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass
class DataBench:
    """What is timed; the sample sizes keep the "before" path (~15 ms per mask) to seconds."""

    before_frames: int = 20
    before_masks: int = 200
    max_side: int = 224
    # 16 x 16 frames: 128 two-frame clips per epoch, enough to amortise a loader's worker start-up
    loader_videos: int = 16
    loader_frames: int = 16
    loader_batch: int = 2
    loader_workers: tuple[int, ...] = (0, 1, 2)
    model_steps: int = 12


# ---------------------------------------------------------------------------- format version 1, kept verbatim


def before_resample_mask(rle: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    from sam3_core.data.ytvis import mask_to_rle, rle_to_mask

    coverage = Image.fromarray(rle_to_mask(rle).astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return mask_to_rle(np.asarray(coverage) >= 0.5)


def before_stage_frame(path: Path, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    with Image.open(path) as image:
        small = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    small.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- data prep


def _rate(count: int, work: Callable[[], Any]) -> float:
    """Items per CPU second of this process (CPU time: other load on the machine matters less)."""
    start = time.process_time()
    work()
    return count / (time.process_time() - start)


def _data_prep_rows(bench: DataBench, root: Path) -> list[tuple[str, str, str]]:
    from bench.saco_video import write_saco_video
    from sam3_core.data.prep import DataPrepConfig, prepare_dataset
    from sam3_core.data.resample import encode_frame, resample_mask, resize_frame
    from sam3_core.data.staging import target_size

    annotations = write_saco_video(root / "source")
    doc = json.loads(annotations.read_text())
    video = doc["videos"][0]
    frames = [root / "source" / "JPEGImages_24fps" / name for name in video["file_names"]]
    masks = [s for a in doc["annotations"] for s in a["segmentations"] if s is not None]
    width, height = target_size(video["width"], video["height"], bench.max_side)

    before_fps = _rate(
        bench.before_frames, lambda: [before_stage_frame(p, width, height) for p in frames[: bench.before_frames]]
    )
    before_mps = _rate(
        bench.before_masks, lambda: [before_resample_mask(m, width, height) for m in masks[: bench.before_masks]]
    )

    def after_frames() -> None:
        for path in frames:
            encode_frame(resize_frame(path.read_bytes(), width, height)[0], "jpeg", 90)

    after_fps = _rate(len(frames), after_frames)
    after_mps = _rate(len(masks), lambda: [resample_mask(m, width, height) for m in masks])
    same = sum(
        resample_mask(m, width, height) == before_resample_mask(m, width, height) for m in masks[: bench.before_masks]
    )

    walls, cpu = {}, 0.0
    for workers in (1, 2):
        cfg = DataPrepConfig(
            source="saco",
            annotations=str(annotations),
            frames_root=str(root / "source" / "JPEGImages_24fps"),
            store=str(root / f"store-{workers}"),
            resize_max_side=bench.max_side,
            val_fraction=0.0,
            workers=workers,
        )
        start, start_cpu = time.perf_counter(), time.process_time()
        prepare_dataset(cfg)
        walls[workers] = time.perf_counter() - start
        if workers == 1:  # one worker runs in this process: its CPU time is the whole cost
            cpu = time.process_time() - start_cpu
    before_total = len(frames) / before_fps + len(masks) / before_mps
    return [
        (
            "frames/s per core (decode, resize, encode)",
            f"{before_fps:.1f}",
            f"{after_fps:.1f}  ({after_fps / before_fps:.1f}x)",
        ),
        ("masks/s per core (resample)", f"{before_mps:.1f}", f"{after_mps:.0f}  ({after_mps / before_mps:.0f}x)"),
        (f"masks equal to before (of {bench.before_masks})", "-", str(same)),
        (
            "video end to end, s (before: frames + masks only)",
            f"{before_total:.1f}",
            f"{walls[1]:.2f} (1 worker, {cpu:.2f} CPU s), {walls[2]:.2f} (2 workers) wall; target <= 5",
        ),
    ]


# ---------------------------------------------------------------------------- loader vs model


class _Frames:
    """Picklable frame loader for the DataLoader workers, as the trainer's."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __call__(self, name: str) -> np.ndarray:
        return np.array(self.reader.image(name))


def _loader_clips_per_s(uri: str, workers: int, cache: Path, bench: DataBench, epochs: int = 2) -> list[float]:
    """Clips/s of each epoch of the training loader (a fresh cache: the first epoch downloads)."""
    from torch.utils.data import DataLoader

    from sam3_core.data.clips import ClipConfig, ClipDataset
    from sam3_core.data.datapoints import collate_clips
    from sam3_core.data.frames import FrameReader

    reader = FrameReader(uri, cache_dir=cache)
    clips = ClipDataset(reader.dataset("train"), _Frames(reader), ClipConfig(), image_size=112, seed=0)
    loader = DataLoader(clips, batch_size=bench.loader_batch, collate_fn=collate_clips, num_workers=workers)
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in loader:
            pass
        rates.append(len(clips) / (time.perf_counter() - start))
    return rates


def _model_clips_per_s(uri: str, store: Path, bench: DataBench) -> float:
    """Clips/s the tiny model trains on (the trainer's own throughput, loading hidden by 2 loader workers)."""
    from sam3_core.config import load_config
    from sam3_core.train.build import train
    from sam3_core.train.config import TrainConfig

    cfg = load_config(
        "train",
        TrainConfig,
        [
            f"data.uri={uri}",
            f"output.store={store}",
            f"train.max_steps={bench.model_steps}",
            "train.log_every=4",
            f"data.batch_size={bench.loader_batch}",
            "data.num_workers=2",
            "train.num_threads=1",
            "mlflow.enabled=false",
        ],
    )
    history = train(cfg).history
    return statistics.median(record["train/clips_per_s"] for record in history[1:])


def _loader_rows(bench: DataBench, root: Path) -> list[tuple[str, str, str]]:
    from moto.server import ThreadedMotoServer

    from sam3_core.data.prep import DataPrepConfig, prepare_dataset
    from sam3_core.data.synthetic import SyntheticConfig

    videos = SyntheticConfig(
        num_videos=bench.loader_videos, frames_per_video=bench.loader_frames, height=240, width=320
    )
    cfg = DataPrepConfig(
        source="synthetic", synthetic=videos, store=str(root / "store"), resize_max_side=bench.max_side
    )
    local = prepare_dataset(cfg)
    # one request log line per frame read would bury the table
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    try:
        host, port = server.get_host_and_port()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench"
        )
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(
            Bucket="bench"
        )
        remote = prepare_dataset(
            DataPrepConfig(
                source="synthetic", synthetic=videos, store="s3://bench/store", resize_max_side=bench.max_side
            )
        )
        rows = []
        for workers in bench.loader_workers:
            here = _loader_clips_per_s(local.uri, workers, root / f"cache-local-{workers}", bench)
            s3 = _loader_clips_per_s(remote.uri, workers, root / f"cache-s3-{workers}", bench)
            rows.append(
                (f"loader, {workers} worker(s): local | S3 cold, warm", f"{here[-1]:.1f}", f"{s3[0]:.1f}, {s3[1]:.1f}")
            )
        model = _model_clips_per_s(local.uri, root / "runs", bench)
        rows.append(("tiny model train step (consumes)", f"{model:.2f}", "-"))
        return rows
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    bench = DataBench()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-data-") as tmp:
        prep_rows = _data_prep_rows(bench, Path(tmp) / "prep")
        loader_rows = _loader_rows(bench, Path(tmp) / "loader")
    print(
        f"data prep, SA-Co/VEval-shaped video (146 frames 720x1280, 33 masklets, 4359 masks) -> resize_max_side="
        f"{bench.max_side}; rates per CPU second of one process; {os.cpu_count()} CPUs"
    )
    print(f"{'':<52}{'before':>12}   after")
    for name, before, after in prep_rows:
        print(f"{name:<52}{before:>12}   {after}")
    print(
        f"\ntraining loader, clips/s ({bench.loader_batch}-clip batches of 2 frames, {bench.loader_videos} videos x "
        f"{bench.loader_frames} frames, JPEG {bench.max_side} px), vs the tiny model's consumption (1 torch thread)"
    )
    print(f"{'':<52}{'local':>12}   S3 (moto)")
    for name, local, s3 in loader_rows:
        print(f"{name:<52}{local:>12}   {s3}")


if __name__ == "__main__":
    main()
