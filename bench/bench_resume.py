"""Host memory of a resume on 1 and 2 ranks of one machine: a private copy per rank vs the mapped state.

A regression model of `PARAMS` float32 parameters is trained one step with AdamW and checkpointed
by the real hooks (state: weights + two moments, ~3x the weights). Then 1 or 2 torchrun
processes (gloo) each build it again and resume from that last.pt, in a fresh process per case:

- "private copy": what every rank did before issue 18, `torch.load` of a downloaded copy
  (`load_checkpoint`, no mmap) into the trainer;
- "mapped": `load_training_state`, the trainer's resume now: the file mapped, once per machine.

A thread samples /proc/self/status every 2 ms while the state loads. Printed per case: the peak
of the rank's private (anonymous) memory above what it held before loading, the peak of its whole
resident set (mapped file pages included) above the same point, and the sum of the private peaks
over the machine's ranks. Mapped pages are the page cache's: shared by the ranks that map the
same file, and reclaimable, so they do not count toward an OOM kill the way private pages do.
On CPU the optimizer state keeps reading from the mapping until a step writes it; on a GPU it is
copied to the device while it loads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS = 32 * 2**20  # 128 MiB of float32 weights, a ~384 MiB training state
LOADERS = ("private copy", "mapped")
MIB = 2**20


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class PeakMemory:
    """Peaks of RssAnon and VmRSS, sampled by a thread while the context is open."""

    def __init__(self) -> None:
        self.peak = _status()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = _status()
            self.peak = {key: max(self.peak[key], now[key]) for key in now}
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = _status()
        self.peak = {key: max(self.peak[key], now[key]) for key in now}


def _trainer(store: str, max_steps: int):
    """The regression model with the real loop and checkpoint hooks, writing into `<store>/runs/run`."""
    import torch
    from torch import nn

    from sam3_core import comm
    from sam3_core.train.data import MicroBatches
    from sam3_core.train.hooks import AwaitUploads, PeriodicCheckpoint
    from sam3_core.train.optim import OptimConfig, build_optimizer, build_scheduler
    from sam3_core.train.run import RunFolder
    from sam3_core.train.trainer import Trainer, seed_everything
    from sam3_core.train.uploads import BackgroundUploads

    class Points(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.full((1024,), float(index))

    class Regression:
        def to_device(self, batch: torch.Tensor) -> torch.Tensor:
            return batch

        def losses(self, model: nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": model(batch).pow(2).mean()}

        def counts(self, batch: torch.Tensor) -> dict[str, int]:
            return {"samples": int(batch.shape[0])}

    seed_everything(0)
    module = nn.Sequential(nn.Linear(1024, PARAMS // 1024, bias=False), nn.Linear(PARAMS // 1024, 1, bias=False))
    cfg = OptimConfig(lr=1e-3, warmup_steps=0)
    optimizer = build_optimizer(module, cfg)
    data = MicroBatches(Points(), 2, torch.stack, seed=0, rank=comm.rank(), world_size=comm.world_size())
    model = nn.parallel.DistributedDataParallel(module) if comm.world_size() > 1 else module
    run = RunFolder(f"{store}/runs/run")
    uploads = BackgroundUploads()
    hooks = [
        PeriodicCheckpoint(max_steps, run, uploads),
        AwaitUploads(uploads, 600),
    ]
    return Trainer(
        model=model,
        module=module,
        task=Regression(),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, max_steps),
        data=data,
        max_steps=max_steps,
        hooks=hooks,
    )


def worker(out: str, store: str, loader: str) -> None:
    """One torchrun process: rebuild the model and load last.pt with `loader`; rank 0 writes what all measured."""
    import torch

    from sam3_core import comm
    from sam3_core.model.checkpoint import load_checkpoint, load_training_state

    torch.set_num_threads(1)
    comm.init_process_group(600)
    trainer = _trainer(store, max_steps=2)
    uri = f"{store}/runs/run/checkpoints/last.pt"
    before = _status()
    with PeakMemory() as peak:
        state = load_training_state(uri) if loader == "mapped" else load_checkpoint(uri)
        trainer.load_state_dict(state)
        del state
    record = {key: peak.peak[key] - before[key] for key in before}
    records = comm.gather_object(record)
    if comm.is_main():
        Path(out).write_text(json.dumps(records))
    comm.barrier()
    trainer.data.close()
    comm.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(processes: int, out: Path, store: str, loader: str) -> list[dict[str, int]]:
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
        "bench.bench_resume",
        "--worker",
        str(out),
        store,
        loader,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-process resume failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-resume-") as tmp:
        store = str(Path(tmp) / "store")
        _trainer(store, max_steps=1).fit()
        size = Path(store, "runs", "run", "checkpoints", "last.pt").stat().st_size
        results = {
            (loader, ranks): _launch(ranks, Path(tmp) / f"{ranks}-{loader.replace(' ', '-')}.json", store, loader)
            for ranks in (1, 2)
            for loader in LOADERS
        }
    print(
        f"resume of a {size / MIB:.0f} MiB training state (weights + AdamW moments) on one machine, local store; "
        "peaks above the memory each rank held before loading, MiB"
    )
    print(f"{'loader':<14}{'ranks':>6}{'private / rank':>16}{'resident / rank':>17}{'private, all ranks':>20}")
    for (loader, ranks), records in results.items():
        private = [r["RssAnon"] / MIB for r in records]
        resident = [r["VmRSS"] / MIB for r in records]
        print(f"{loader:<14}{ranks:>6}{max(private):>16.0f}{max(resident):>17.0f}{sum(private):>20.0f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
    else:
        main()
