"""Training step time: sam3pipe's trainer next to a bare forward/backward/step loop, 1 and 2 processes.

The trainer's step (`Trainer.train_step`: clip loading and collation, by a background thread one
step ahead, the loss, backward, gradient clipping, the NaN/Inf guard, the per-step all-reduce of
the statistics, AdamW, the schedule, and the per-step hooks) is timed against the least a step
can do on the same model: forward, loss, backward and AdamW on the same micro-batches, in the
order the trainer draws them, loaded and collated up front, with no logging or checkpoints. Their
ratio is the trainer's overhead. Each process count runs under torchrun (gloo on CPU, DDP for 2)
on one synthetic dataset; the two loops alternate in rounds so a change in machine load hits both
alike. Rank 0 writes the per-step times as JSON and this process prints the table.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TrainBench:
    """What is timed: the tiny preset's defaults, `rounds` x `steps_per_round` steps per loop."""

    process_counts: tuple[int, ...] = (1, 2)
    warmup_steps: int = 3
    rounds: int = 8
    steps_per_round: int = 5
    # torch threads per process: one per core keeps 1 and 2 processes comparable
    threads: int = 1
    num_videos: int = 8
    frames_per_video: int = 8
    timeout_s: int = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _timed_steps(step: Callable[[], Any], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker(out_path: str, overrides: list[str], bench: TrainBench) -> None:
    """One torchrun process: build the trainer, then time its step and the bare step in turns."""
    from sam3_core import comm
    from sam3_core.config import load_config
    from sam3_core.train.build import build_trainer
    from sam3_core.train.config import TrainConfig
    from sam3_core.train.data import MicroBatches

    # no validation or checkpoint falls inside the timed steps: what is timed is the step itself (with
    # the best checkpoint chosen by train/loss, every logged improvement would save one)
    quiet = [
        "train.val_every=0",
        "train.best_metric=train/loss",
        "train.best_mode=min",
        "train.log_every=100000",
        "train.max_steps=100000",
    ]
    cfg = load_config("train", TrainConfig, [*overrides, *quiet, f"train.num_threads={bench.threads}"])
    trainer = build_trainer(cfg)
    for hook in trainer.hooks:
        hook.before_train()
    trainer.model.train()
    # the micro-batches the trainer will draw, in its order, loaded up front from a twin of its stream
    # (over a copy of the dataset, whose epoch it sets): both loops step through the same clips, so the
    # ranks' imbalance of objects per step (which a DDP step waits for) is alike in both
    twin = MicroBatches(
        copy.copy(trainer.data.dataset),
        cfg.data.batch_size,
        trainer.data.collate,
        seed=cfg.train.seed,
        prefetch_factor=0,
        rank=comm.rank(),
        world_size=comm.world_size(),
    )
    batches = []
    for _ in range(bench.warmup_steps + bench.rounds * bench.steps_per_round):
        batch = trainer.task.to_device(next(twin))
        batches.append((batch, [trainer.module.detector.back_convert(t) for t in batch.find_targets]))
    cursor = iter(batches)

    def ours() -> None:
        trainer.train_step()

    def bare() -> None:
        batch, targets = next(cursor)
        with trainer.autocast():
            losses = trainer.task.loss_fn(trainer.model(batch), targets)
        losses["core_loss"].backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    _timed_steps(ours, bench.warmup_steps)
    _timed_steps(bare, bench.warmup_steps)
    times: dict[str, list[float]] = {"trainer": [], "bare": []}
    for _ in range(bench.rounds):
        times["trainer"] += _timed_steps(ours, bench.steps_per_round)
        times["bare"] += _timed_steps(bare, bench.steps_per_round)
    trainer.data.close()
    if comm.is_main():
        Path(out_path).write_text(json.dumps({"world_size": comm.world_size(), **times}))
    comm.barrier()
    comm.shutdown()


def _dataset(store: Path, bench: TrainBench) -> str:
    from sam3_core.data.prep import DataPrepConfig, prepare_dataset
    from sam3_core.data.synthetic import SyntheticConfig

    videos = SyntheticConfig(num_videos=bench.num_videos, frames_per_video=bench.frames_per_video)
    return prepare_dataset(DataPrepConfig(source="synthetic", synthetic=videos, store=str(store))).uri


def _launch(
    processes: int, overrides: list[str], out: Path, bench: TrainBench, module: str = "bench.bench_train"
) -> dict[str, Any]:
    """Run `module --worker out overrides...` under torchrun; what rank 0 wrote to `out`."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        module,
        "--worker",
        str(out),
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=bench.timeout_s
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process bench failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    bench = TrainBench()
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-train-") as tmp:
        root = Path(tmp)
        overrides = [f"data.uri={_dataset(root / 'store', bench)}", f"output.store={root / 'store'}"]
        results = {n: _launch(n, overrides, root / f"times_{n}.json", bench) for n in bench.process_counts}
    timed = bench.rounds * bench.steps_per_round
    device = f"GPU {torch.cuda.get_device_name(0)}, nccl" if torch.cuda.is_available() else "CPU, gloo"
    print(
        f"train step, tiny preset (112 px, 2 clips x 2 frames per process), median of {timed} steps after "
        f"{bench.warmup_steps} warm-up; {os.cpu_count()} CPUs, {bench.threads} torch thread(s) per process, "
        f"{device}, torch {torch.__version__}"
    )
    print(f"{'processes':<12}{'trainer s/step':>16}{'bare s/step':>14}{'trainer/bare':>14}")
    for processes, result in results.items():
        ours, bare = statistics.median(result["trainer"]), statistics.median(result["bare"])
        print(f"{processes:<12}{ours:>16.3f}{bare:>14.3f}{ours / bare:>13.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3:], TrainBench())
    else:
        main()
