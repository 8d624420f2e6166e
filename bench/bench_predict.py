"""`inference=sam3_video` against sam3's own video predictor, on the same weights and video, side by side.

1. speed, one process: one prompt over one video through sam3's session API (`Sam3VideoPredictor`:
   start_session on the frame folder, text prompt, propagate) and through ours (frames streamed,
   state trimmed), alternated, with their masklets compared;
2. ranks: the whole predict loop on 1 and 2 gloo ranks (torchrun), with the video's frames and
   tracks spread over the ranks by sam3's own multi-GPU inference (`parallel=frames`) and with
   whole videos per rank (`parallel=videos`);
3. memory: peak RSS of one prompt over a video of N frames (a clip played back and forth), each
   run in a fresh process, sam3's session against ours.

The model is the tiny preset with random weights biased to detect and keep tracks (as the parity
tests do): its speed says nothing about accuracy, only about the video inference around it.
`python -m bench predict` (or `python -m bench.bench_predict [speed|ranks|memory]`).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = "red circle"


@dataclass
class PredictBench:
    frames: int = 24
    repeats: int = 3
    videos: int = 4
    video_frames: int = 12
    memory_frames: tuple[int, ...] = (50, 100, 200, 400)
    # source frame size of the memory runs: sam3 keeps every output mask at this size
    memory_side: tuple[int, int] = (360, 480)


def _setup(assoc_iou_thresh: float = 0.9) -> tuple[Any, Any, Any]:
    """The model config, heuristics and a maker of the biased model. A strict association (0.9) makes
    a track of nearly every detection (more work per frame); sam3's 0.1 keeps the same few tracks."""
    from sam3_core.model.config import ModelConfig, TrackerConfig
    from sam3_core.model.tracker import VideoInferenceConfig, build_video_model

    model_cfg = ModelConfig(tracker=TrackerConfig())
    heuristics = VideoInferenceConfig(
        score_threshold_detection=0.1, new_det_thresh=0.1, assoc_iou_thresh=assoc_iou_thresh
    )

    def lively() -> Any:
        model = build_video_model(model_cfg, heuristics)
        with torch.no_grad():
            model.tracker.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
            model.detector.transformer.decoder.presence_token_head.layers[-1].bias.fill_(5.0)
            model.detector.dot_prod_scoring.prompt_proj.weight.mul_(10.0)
        return model

    return model_cfg, heuristics, lively


def _dataset(root: Path, videos: int, frames: int, size: tuple[int, int] = (96, 128)) -> Any:
    from sam3_core.data.prep import DataPrepConfig, prepare_dataset
    from sam3_core.data.synthetic import SyntheticConfig

    synthetic = SyntheticConfig(
        num_videos=videos,
        frames_per_video=frames,
        height=size[0],
        width=size[1],
        min_objects=2,
        max_objects=3,
        categories=[PROMPT, "blue square"],
        min_size=size[0] // 5,
        max_size=size[0] // 3,
        max_speed=3.0,
    )
    return prepare_dataset(
        DataPrepConfig(source="synthetic", synthetic=synthetic, store=str(root / "store"), val_fraction=0.5)
    )


def _frame_folder(reader: Any, video: Any, folder: Path, length: int) -> list[Path]:
    """`length` frames of `video` played back and forth, as a folder sam3's session reads (links)."""
    folder.mkdir(parents=True, exist_ok=True)
    period = 2 * video.length - 2
    paths = []
    for t in range(length):
        name = video.file_names[min(t % period, period - t % period)]
        link = folder / f"{t:05d}{Path(name).suffix}"
        link.symlink_to(reader.local_path(name))
        paths.append(link)
    return paths


def _sam3_session(model: Any, folder: Path) -> dict[int, dict[int, dict]]:
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    from sam3_core.model.tracker import inference_context
    from sam3_core.predict.postprocess import encode_mask

    session = object.__new__(Sam3VideoPredictor)
    session.model, session.async_loading_frames, session.video_loader_type = model, False, "cv2"
    masks: dict[int, dict[int, dict]] = {}
    with inference_context(torch.device("cpu")):
        session_id = session.handle_request({"type": "start_session", "resource_path": str(folder)})["session_id"]
        session.handle_request({"type": "add_prompt", "session_id": session_id, "frame_index": 0, "text": PROMPT})
        request = {"type": "propagate_in_video", "session_id": session_id, "propagation_direction": "forward"}
        for response in session.handle_stream_request(request):
            outputs = response["outputs"]
            for obj_id, mask in zip(outputs["out_obj_ids"].tolist(), outputs["out_binary_masks"]):
                masks.setdefault(int(obj_id), {})[response["frame_index"]] = encode_mask(torch.from_numpy(mask))
        session.handle_request({"type": "close_session", "session_id": session_id})
    return masks


def _ours(model: Any, paths: list[Path], size: tuple[int, int], image_size: int) -> dict[int, dict[int, dict]]:
    from sam3_core.model.tracker import inference_context
    from sam3_core.predict.sam3_video import StreamedFrames, prompt_masklets

    frames = StreamedFrames(lambda t: Image.open(paths[t]), len(paths), image_size)
    with inference_context(torch.device("cpu")):
        found = prompt_masklets(model, frames, size[0], size[1], PROMPT)
    return {obj_id: m.rles for obj_id, m in found.items()}


def speed(bench: PredictBench, root: Path) -> None:
    from sam3_core.data.frames import FrameReader

    model_cfg, _, lively = _setup()
    dataset = _dataset(root, 2, bench.frames)
    reader = FrameReader(dataset.uri)
    video = reader.dataset("val").videos[0]
    paths = _frame_folder(reader, video, root / "speed-frames", video.length)
    model = lively()
    times: dict[str, list[float]] = {"sam3 session": [], "sam3_video (ours)": []}
    results = {}
    for _ in range(bench.repeats):
        for name in times:
            start = time.perf_counter()
            if name == "sam3 session":
                results[name] = _sam3_session(model, paths[0].parent)
            else:
                results[name] = _ours(model, paths, (video.height, video.width), model_cfg.image_size)
            times[name].append(time.perf_counter() - start)
    same = results["sam3 session"] == results["sam3_video (ours)"]
    objects = len(results["sam3 session"])
    print(
        f"one prompt, {video.length} frames of {video.width}x{video.height}, {objects} masklets; masklets equal: {same}"
    )
    print("| runner | median s | frames/s | per-run s |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} | {video.length / median:.1f} | {runs} |")
    ratio = statistics.median(times["sam3 session"]) / statistics.median(times["sam3_video (ours)"])
    print(f"ours runs at {ratio:.2f}x the speed of sam3's session")


def ranks(bench: PredictBench, root: Path) -> None:
    _, heuristics, lively = _setup()
    dataset = _dataset(root, 2 * bench.videos, bench.video_frames)
    checkpoint = root / "lively.pt"
    torch.save(lively().state_dict(), checkpoint)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    outputs = {}
    for parallel in ("videos", "frames"):
        for world in (1, 2):
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
            command += [
                "-m",
                "bench.predict_worker",
                str(checkpoint),
                dataset.uri,
                parallel,
                json.dumps(_heuristics(heuristics)),
            ]
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            outputs[(parallel, world)] = result.pop("masklets")
            rows.append((parallel, world, result))
    print(f"{bench.videos} videos x {bench.video_frames} frames, 2 prompts, gloo, 1 thread per rank")
    print("| parallel | ranks | predict loop s | speed-up | masklets equal to 1 rank |")
    print("| --- | --- | --- | --- | --- |")
    for parallel, world, result in rows:
        alone = next(r for p, w, r in rows if p == parallel and w == 1)["seconds"]
        same = outputs[(parallel, world)] == outputs[(parallel, 1)]
        print(f"| {parallel} | {world} | {result['seconds']:.1f} | {alone / result['seconds']:.2f}x | {same} |")


def _heuristics(heuristics: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(heuristics)


def memory(bench: PredictBench, root: Path) -> None:
    dataset = _dataset(root, 2, 16, bench.memory_side)
    print(f"peak RSS of one prompt over N frames of {bench.memory_side[1]}x{bench.memory_side[0]}, fresh process each")
    print("| frames | masklets | sam3 session MB | sam3 session growth MB | ours MB | ours growth MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for frames in bench.memory_frames:
        row = {}
        for runner in ("sam3", "ours"):
            command = [sys.executable, "-m", "bench.bench_predict", "memory-run", runner, dataset.uri, str(frames)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode:
                raise RuntimeError(done.stderr[-3000:])
            row[runner] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {frames} | {row['ours']['masklets']} | {row['sam3']['peak_mb']:.0f} | {row['sam3']['growth_mb']:.0f} | "
            f"{row['ours']['peak_mb']:.0f} | {row['ours']['growth_mb']:.0f} |"
        )


def memory_run(runner: str, dataset_uri: str, frames: int) -> None:
    """One memory measurement (in its own process): peak RSS, and its growth past the model's build."""
    import psutil

    from sam3_core.data.frames import FrameReader

    torch.set_num_threads(1)
    model_cfg, _, lively = _setup(assoc_iou_thresh=0.1)
    model = lively()
    reader = FrameReader(dataset_uri)
    video = reader.dataset("val").videos[0]
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-") as tmp:
        paths = _frame_folder(reader, video, Path(tmp) / "frames", frames)
        before = psutil.Process().memory_info().rss
        if runner == "sam3":
            found = _sam3_session(model, paths[0].parent)
        else:
            found = _ours(model, paths, (video.height, video.width), model_cfg.image_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_mb": peak / 2**20, "growth_mb": (peak - before) / 2**20, "masklets": len(found)}))


def main(parts: tuple[str, ...] = ("speed", "ranks", "memory"), bench: PredictBench | None = None) -> None:
    bench = bench or PredictBench()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="sam3pipe-bench-predict-"))
    try:
        for part in parts:
            print(f"\n### {part}")
            start = time.perf_counter()
            {"speed": speed, "ranks": ranks, "memory": memory}[part](bench, root / part)
            print(f"({part}: {time.perf_counter() - start:.0f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory-run"]:
        memory_run(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1:
        main(tuple(sys.argv[1:]), replace(PredictBench()))
    else:
        main()
