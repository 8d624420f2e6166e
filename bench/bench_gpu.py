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

`python -m bench gpu --quick` is the short check of a GPU machine (issue 18), one script for one
GPU, under 8 minutes: the environment (torch, CUDA, NCCL, bf16, a C compiler for Triton); Triton
compiling sam3's focal loss (forward and backward against the torch formula); the real trainer on
one NCCL rank (DDP) with the `full` preset at 1008 px, clips of 2 frames, batch 1, gradient
accumulation 2, validation and a checkpoint at step 2 (where the first process stops, as a
preemption would), then a new process resuming to step 6; 2 steps with LoRA (best.pt merged on
the CPU, loaded back into a plain detector); `frame_detector` on one frame with 40 prompts, fp32
and bf16; 2 steps of the tracker stage (`train.stage=tracker`, VOS validation, best.pt in SAM3's
video layout). It prints one table per mode (seconds per step or frame, peak GPU memory, host memory
of the resume) and exits 0 only when every check passed; without CUDA it prints one line and
exits 2. The trainer runs in torchrun subprocesses; the checks are the functions in
`QUICK_STAGES`, in order: another stage is one more function there.
`--allow-cpu` runs the same script on CPU with the tiny preset and gloo, to try the script itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import tracker_step
from bench.largest_batch import largest_batch
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
            largest = str(largest_batch(functools.partial(step.fits, frames), limit)) if limit else "-"
            print(f"{mode:>7} {trainable:>12.1f} {frames:>6} {seconds:>8.3f} {peak:>9.2f} {largest:>10}", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- bench gpu --quick

REPO = Path(__file__).resolve().parents[1]
QUICK_DEADLINE_S = 480
GIB = 2**30
# the trainer's settings in the quick check (full preset: 1008 px)
QUICK_TRAIN = [
    "data.batch_size=1",
    "data.clips.frames_per_clip=2",
    "train.grad_accum_steps=2",
    "train.val_every=2",
    "train.checkpoint_every=2",
    "train.keep_step_checkpoints=false",
    "train.val_max_clips=1",
    "train.val_max_frames=2",
    "train.log_every=1",
    "train.best_metric=val/loss",
    "train.best_mode=min",
    "mlflow.enabled=false",
]
FIRST_STOP, LAST_STEP, LORA_STEPS = 2, 6, 2
# the tracker stage in the quick check: clips of the quick dataset's 4 frames, SAM2's 7 corrective clicks
QUICK_TRACKER = [
    "train.stage=tracker",
    "data.tracker_clips.frames_per_clip=4",
    "train.val_max_videos=1",
    "train.best_metric=val/vos_JF_mean",
    "train.best_mode=max",
]
TRACKER_STEPS = 2
DETECTOR_PROMPTS = 40


@dataclass
class StageResult:
    """One mode's table: its rows (column -> text), whether its checks passed, and why not."""

    mode: str
    rows: list[dict[str, str]]
    passed: bool
    problems: list[str] = field(default_factory=list)


@dataclass
class QuickContext:
    """What the stages share: the device, the preset, a work folder, the clock."""

    device: torch.device
    preset: str
    work: Path
    deadline: float
    dataset_uri: str = ""

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}" if value == value else "-"


def _status_bytes() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class HostPeak:
    """Peaks of this process's private (RssAnon) and resident (VmRSS) memory between start and stop."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = _status_bytes()
            self.peak = {key: max(self.peak.get(key, 0), value) for key, value in now.items()}
            time.sleep(0.005)

    def start(self) -> None:
        self.peak = _status_bytes()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def environment(ctx: QuickContext) -> list[StageResult]:
    """torch, CUDA, NCCL, bf16, and the C compiler Triton needs."""
    import triton
    from triton.runtime import build

    cuda = ctx.device.type == "cuda"
    problems = []
    compiler = ""
    try:
        compiler = build._find_compiler("c")
    except RuntimeError as exc:
        problems.append(f"Triton finds no C compiler: {exc}")
    row = {
        "torch": torch.__version__,
        "CUDA": str(torch.version.cuda),
        "device": torch.cuda.get_device_name(ctx.device) if cuda else "CPU",
        "memory GiB": _gib(torch.cuda.get_device_properties(ctx.device).total_memory) if cuda else "-",
        "NCCL": _nccl_version() if cuda else "-",
        "bf16": str(torch.cuda.is_bf16_supported()) if cuda else "-",
        "triton": triton.__version__,
        "C compiler": compiler or "none",
    }
    if cuda and not torch.cuda.is_bf16_supported():
        problems.append("the GPU has no bf16: train.amp=auto would not run")
    return [StageResult("environment", [row], not problems, problems)]


def triton_focal_loss(ctx: QuickContext) -> list[StageResult]:
    """sam3's Triton focal loss (both kernels, forward and backward) against its torch formula."""
    from sam3.train.loss.loss_fns import sigmoid_focal_loss

    if ctx.device.type != "cuda":
        return [StageResult("triton focal loss", [{"result": "skipped on CPU"}], True)]
    # shaped like the mask loss's inputs: matched masks x sampled points
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    logits = torch.randn(200, 4096, device=ctx.device, generator=generator)
    targets = (torch.rand(200, 4096, device=ctx.device, generator=generator) > 0.9).float()
    rows, problems = [], []
    for reduce in (True, False):
        values, grads, seconds = [], [], []
        for triton in (True, False):
            inputs = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            loss = sigmoid_focal_loss(inputs, targets, 3.0, alpha=0.25, gamma=2.0, reduce=reduce, triton=triton)
            loss.sum().backward()
            torch.cuda.synchronize(ctx.device)
            seconds.append(time.perf_counter() - start)
            values.append(loss.detach().float())
            grads.append(inputs.grad.float())
        close = torch.allclose(values[0], values[1], rtol=1e-3, atol=1e-6) and torch.allclose(
            grads[0], grads[1], rtol=1e-3, atol=1e-7
        )
        if not close:
            problems.append(f"reduce={reduce}: the Triton loss or its gradient differs from the torch formula")
        rows.append(
            {
                "kernel": "reduce" if reduce else "elementwise",
                "first call s (compile)": f"{seconds[0]:.2f}",
                "torch s": f"{seconds[1]:.3f}",
                "max |diff|": f"{(values[0] - values[1]).abs().max().item():.2e}",
                "matches torch": str(close),
            }
        )
    return [StageResult("triton focal loss", rows, not problems, problems)]


def _quick_dataset(ctx: QuickContext) -> str:
    """A small synthetic dataset (4 videos x 4 frames, 1 for validation); the model resizes to its size."""
    from sam3_core.data.prep import DataPrepConfig, prepare_dataset
    from sam3_core.data.synthetic import SyntheticConfig

    if not ctx.dataset_uri:
        videos = SyntheticConfig(num_videos=4, frames_per_video=4, height=256, width=256)
        config = DataPrepConfig(source="synthetic", synthetic=videos, store=str(ctx.work / "store"))
        ctx.dataset_uri = prepare_dataset(config).uri
    return ctx.dataset_uri


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_process(ctx: QuickContext, name: str, phase: str, overrides: list[str]) -> dict[str, Any]:
    """One torchrun process of the trainer (see `train_worker`); what it recorded, or its error."""
    out = ctx.work / f"{name}-{phase}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "bench.bench_gpu",
        "--train-worker",
        str(out),
        phase,
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    timeout = max(ctx.seconds_left(), 1.0)
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{phase}: over the time left ({timeout:.0f} s)"}
    if proc.returncode != 0 or not out.exists():
        return {"error": f"{phase}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.read_text())


def train_worker(out: str, phase: str, overrides: list[str]) -> None:
    """Run under torchrun: the real trainer on one rank of an nccl group (gloo on CPU).

    phase "first": trains to step FIRST_STOP of a LAST_STEP-step run and stops there (its last step,
    so it validates and checkpoints), as a preemption would after a checkpoint; "resume": the same
    command in a new process, resuming from last.pt to LAST_STEP; "lora": LORA_STEPS steps.
    """
    import torch.distributed as dist

    from sam3_core.config import load_config
    from sam3_core.model.checkpoint import load_model_weights
    from sam3_core.train.build import build_trainer
    from sam3_core.train.config import TrainConfig
    from sam3_core.train.hooks import PeriodicCheckpoint
    from sam3_core.train.trainer import HookBase

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo")
    cfg = load_config("train", TrainConfig, overrides)
    logged: list[dict[str, float]] = []
    trainer = build_trainer(cfg, on_metrics=lambda step, metrics: logged.append({"step": step, **metrics}))
    if phase == "first":
        trainer.max_steps = FIRST_STOP

    host = HostPeak()

    class ResumeStart(HookBase):
        def before_train(self) -> None:
            host.start()

    class ResumeEnd(HookBase):
        def before_train(self) -> None:
            host.stop()

    position = trainer.hooks.index(trainer.find_hook(PeriodicCheckpoint))
    for index, hook in ((position + 1, ResumeEnd()), (position, ResumeStart())):
        hook.trainer = trainer
        trainer.hooks.insert(index, hook)
    before_resume = _status_bytes()
    step_seconds: list[float] = []
    run_step = trainer.run_step

    def timed_step() -> Any:
        start = time.perf_counter()
        result = run_step()
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        return result

    trainer.run_step = timed_step  # type: ignore[method-assign]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit()
    record: dict[str, Any] = {
        "start_step": trainer.start_step,
        "step": trainer.step,
        "step_seconds": step_seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else float("nan"),
        "resume_private_bytes": host.peak.get("RssAnon", 0) - before_resume["RssAnon"],
        "resume_resident_bytes": host.peak.get("VmRSS", 0) - before_resume["VmRSS"],
        "logged": logged,
    }
    if phase == "lora":
        from sam3_core.model.build import build_detector
        from sam3_core.model.video_detector import VideoClipDetector
        from sam3_core.train.run import RunFolder, run_uri_for

        plain = VideoClipDetector(build_detector(cfg.model))
        report = load_model_weights(plain, RunFolder(run_uri_for(cfg)).best_uri)
        record["best_loads_plain"] = not report.missing and not report.unexpected
    if phase == "tracker":
        from sam3_core.model.checkpoint import load_checkpoint
        from sam3_core.model.tracker import build_video_model
        from sam3_core.train.run import RunFolder, run_uri_for

        best = load_checkpoint(RunFolder(run_uri_for(cfg)).best_uri)["model"]
        record["best_video_layout"] = set(best) == set(build_video_model(cfg.model).state_dict())
    Path(out).write_text(json.dumps(record))
    dist.destroy_process_group()


def _train_row(mode: str, record: dict[str, Any], resumed: bool) -> dict[str, str]:
    steps = record.get("step_seconds", [])[1:] or record.get("step_seconds", [])
    return {
        "mode": mode,
        "steps": f"{record.get('start_step', '?')}->{record.get('step', '?')}",
        "s/step": f"{statistics.median(steps):.2f}" if steps else "-",
        "first step s": f"{record['step_seconds'][0]:.1f}" if record.get("step_seconds") else "-",
        "peak GPU GiB": _gib(record.get("peak_gpu_bytes", float("nan"))),
        "host private GiB on resume": _gib(record["resume_private_bytes"]) if resumed else "-",
        "host resident GiB on resume": _gib(record["resume_resident_bytes"]) if resumed else "-",
    }


def _train_problems(
    record: dict[str, Any], start: int, end: int, validate_at: int, val_metric: str = "val/loss"
) -> list[str]:
    if "error" in record:
        return [record["error"]]
    problems = []
    if (record["start_step"], record["step"]) != (start, end):
        problems.append(f"ran steps {record['start_step']}->{record['step']}, expected {start}->{end}")
    losses = [m["train/loss"] for m in record["logged"] if "train/loss" in m]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        problems.append(f"train/loss not finite: {losses}")
    if not any(m["step"] == validate_at and val_metric in m for m in record["logged"]):
        problems.append(f"no {val_metric} at step {validate_at}")
    return problems


def _one_rank(ctx: QuickContext) -> str:
    return "1 rank, " + ("nccl" if ctx.device.type == "cuda" else "gloo") + ", DDP"


def _preset_overrides(ctx: QuickContext) -> list[str]:
    overrides = [f"model={ctx.preset}", f"data.uri={_quick_dataset(ctx)}", f"output.store={ctx.work / 'store'}"]
    return [*overrides, *QUICK_TRAIN, f"train.max_steps={LAST_STEP}"]


def trainer_full(ctx: QuickContext) -> list[StageResult]:
    """Full fine-tuning: steps 1-2 (validation + checkpoint at 2), a new process resuming to step 6."""
    overrides = [*_preset_overrides(ctx), "output.run_name=quick-full"]
    first = _train_process(ctx, "full", "first", overrides)
    problems = _train_problems(first, 0, FIRST_STOP, FIRST_STOP)
    rows = [_train_row("full, steps 1-2", first, resumed=False)]
    if "error" not in first:
        resumed = _train_process(ctx, "full", "resume", overrides)
        problems += _train_problems(resumed, FIRST_STOP, LAST_STEP, LAST_STEP)
        rows.append(_train_row("full, resumed", resumed, resumed=True))
    return [StageResult(f"trainer: full fine-tuning, {_one_rank(ctx)}", rows, not problems, problems)]


def trainer_lora(ctx: QuickContext) -> list[StageResult]:
    """LoRA (rank 16 on the default targets): 2 steps, best.pt exported merged and loaded into a plain model."""
    overrides = [
        *_preset_overrides(ctx),
        "output.run_name=quick-lora",
        "model.lora.rank=16",
        f"train.max_steps={LORA_STEPS}",
    ]
    record = _train_process(ctx, "lora", "lora", overrides)
    problems = _train_problems(record, 0, LORA_STEPS, LORA_STEPS)
    if "error" not in record and not record.get("best_loads_plain"):
        problems.append("best.pt (merged) does not load into a plain detector")
    rows = [_train_row("lora", record, False)]
    return [StageResult(f"trainer: LoRA, {_one_rank(ctx)}", rows, not problems, problems)]


def trainer_tracker(ctx: QuickContext) -> list[StageResult]:
    """The tracker stage (`train.stage=tracker`, detector frozen): 2 steps of 4-frame clips, VOS validation
    and best.pt at step 2, in SAM3's video checkpoint layout."""
    overrides = [
        *_preset_overrides(ctx),
        "output.run_name=quick-tracker",
        *QUICK_TRACKER,
        f"train.max_steps={TRACKER_STEPS}",
    ]
    record = _train_process(ctx, "tracker", "tracker", overrides)
    problems = _train_problems(record, 0, TRACKER_STEPS, TRACKER_STEPS, "val/vos_JF_mean")
    if "error" not in record and not record.get("best_video_layout"):
        problems.append("best.pt does not have the keys of SAM3's video model")
    rows = [_train_row("tracker", record, False)]
    return [StageResult(f"trainer: tracker stage, {_one_rank(ctx)}", rows, not problems, problems)]


def frame_detector_modes(ctx: QuickContext) -> list[StageResult]:
    """`frame_detector` + the frame's top-k on one frame, DETECTOR_PROMPTS prompts, fp32 then bf16."""
    from sam3_core.config import load_config
    from sam3_core.model.chunked_detection import DetectionConfig, frame_detector
    from sam3_core.numerics import use_fast_matmul
    from sam3_core.predict.postprocess import PostprocessConfig, batched_frame_detections

    cfg = load_config("train", TrainConfig, [f"model={ctx.preset}", "data.uri=unused"])
    use_fast_matmul(ctx.device)
    model = VideoClipDetector(build_detector(cfg.model)).to(ctx.device).eval()
    size = cfg.model.image_size
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [f"object {index}" for index in range(DETECTOR_PROMPTS)]
    results = []
    for amp in ("off", "bf16"):
        problems: list[str] = []
        detect = frame_detector(model, prompts, lambda frame: image, DetectionConfig(amp=amp))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
        seconds = []
        for frame in range(4):
            start = time.perf_counter()
            found = batched_frame_detections(
                detect(frame), list(range(DETECTOR_PROMPTS)), frame, (720, 1280), PostprocessConfig()
            )
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            seconds.append(time.perf_counter() - start)
            if len(found) != 100 or not all(math.isfinite(score) for score in found.scores):
                problems.append(f"frame {frame}: {len(found)} detections, scores finite: {found.scores[:3]}")
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else float("nan")
        row = {
            "mode": ("fp32, TF32 matmuls" if ctx.device.type == "cuda" else "fp32")
            if amp == "off"
            else "bf16 autocast",
            "prompts": str(DETECTOR_PROMPTS),
            "prompt batch": str(DetectionConfig().prompt_batch),
            "s/frame": f"{statistics.median(seconds[1:]):.3f}",
            "first frame s": f"{seconds[0]:.2f}",
            "peak GPU GiB": _gib(peak),
        }
        results.append(StageResult(f"frame_detector, {row['mode']}", [row], not problems, problems))
    del model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# The quick check's stages, in order. A stage is `(QuickContext) -> [StageResult, ...]`, one
# StageResult per mode (each printed as its own table).
QUICK_STAGES: list[Callable[[QuickContext], list[StageResult]]] = [
    environment,
    triton_focal_loss,
    trainer_full,
    trainer_lora,
    frame_detector_modes,
    trainer_tracker,
]


def _print_table(result: StageResult) -> None:
    print(f"\n### {result.mode}: {'pass' if result.passed else 'FAIL'}")
    columns = list(dict.fromkeys(key for row in result.rows for key in row))
    widths = {c: max(len(c), *(len(row.get(c, "")) for row in result.rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in result.rows:
        print("  ".join(row.get(c, "").rjust(widths[c]) for c in columns))
    for problem in result.problems:
        print(f"  problem: {problem}")
    sys.stdout.flush()


def quick(preset: str = "full", allow_cpu: bool = False, deadline_s: float = QUICK_DEADLINE_S) -> int:
    """The quick GPU check; 0 when every stage passed, 1 when one failed, 2 without CUDA."""
    if not torch.cuda.is_available() and not allow_cpu:
        print("error: bench gpu --quick needs a CUDA GPU and torch sees none; run it on a GPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    started = time.monotonic()
    print(f"bench gpu --quick: preset {preset}, {device}, at most {deadline_s:.0f} s", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="sam3pipe-gpu-quick-") as tmp:
        ctx = QuickContext(device, preset, Path(tmp), started + deadline_s)
        for stage in QUICK_STAGES:
            if ctx.seconds_left() <= 0:
                failed.append(f"{stage.__name__}: not run, out of time")
                continue
            try:
                results = stage(ctx)
            except Exception as exc:  # a stage that crashes fails the check; the others still run
                results = [StageResult(stage.__name__, [], False, [f"{type(exc).__name__}: {exc}"])]
            for result in results:
                _print_table(result)
                if not result.passed:
                    failed.append(result.mode)
    elapsed = time.monotonic() - started
    print(f"\n{'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} in {elapsed:.0f} s")
    if elapsed > deadline_s:
        print(f"over the {deadline_s:.0f} s budget")
        return 1
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m bench gpu [--quick]`: the full sweep (skipped without CUDA), or the quick check."""
    args = _parser().parse_args(argv or [])
    if args.quick:
        return quick(args.preset, args.allow_cpu)
    run(GpuBench(args.preset, args.allow_cpu, args.steps, lora_rank=args.lora_rank, max_batch=args.max_batch))
    tracker_step.run(tracker_step.TrackerBench(args.preset, args.allow_cpu, args.steps, max_batch=args.max_batch))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short check of a GPU machine (exit 0: all passed)")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU (use --preset tiny)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch tried (0: no search)")
    return parser


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train-worker"]:
        train_worker(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(main(sys.argv[1:]))
