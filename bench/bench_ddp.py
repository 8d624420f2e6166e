"""DDP settings on 2 gloo ranks: the trainer's step with the settings before and after issue 18.

before: every detector parameter trainable, `find_unused_parameters=True` (DDP walks the autograd
graph after every forward to find the parameters that will get no gradient), buffers broadcast
from rank 0 before every forward. after: the parameters sam3's loss never reaches frozen
(`build.UNREACHED`), no search, no buffer broadcast, gradients as views of DDP's buckets.
"find_unused only" is `after` with the search switched back on: the search's own cost.

Each setting wraps the same module in its own DDP for a round of steps, in turns, so a change in
the machine's load hits all alike; the trainer's `run_step` is timed (its micro-batches loaded in
the step). Tiny preset on CPU: the shares measured here are of a 112 px step of a 4.5M-parameter
model; the walk and the buffer broadcast scale with the model's graph and buffers, the step with
its arithmetic, so on a GPU step of the full model they are smaller shares, not larger.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_train import TrainBench, _dataset, _launch

SETTINGS = ("before", "find_unused only", "after")
ROUNDS = 6
STEPS_PER_ROUND = 5
WARMUP_STEPS = 3


def _setting(name: str) -> tuple[bool, dict[str, Any]]:
    """Whether the unreached parameters are frozen, and DDP's arguments."""
    after = name != "before"
    ddp = {
        "find_unused_parameters": name != "after",
        "broadcast_buffers": not after,
        "gradient_as_bucket_view": after,
    }
    return after, ddp


def worker(out_path: str, overrides: list[str]) -> None:
    """One torchrun process: the real trainer, its module wrapped in each setting's DDP in turns."""
    from torch.nn.parallel import DistributedDataParallel

    from sam3_core import comm
    from sam3_core.config import load_config
    from sam3_core.train.build import UNREACHED, build_trainer
    from sam3_core.train.config import TrainConfig

    quiet = ["train.val_every=0", "train.best_metric=train/loss", "train.max_steps=100000", "train.log_every=100000"]
    cfg = load_config("train", TrainConfig, [*overrides, *quiet, "train.num_threads=1"])
    trainer = build_trainer(cfg)
    module = trainer.module
    unreached = [p for n, p in module.detector.named_parameters() if any(n.startswith(u) for u in UNREACHED)]
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for round_index in range(ROUNDS + 1):
        for name in SETTINGS:
            frozen, ddp = _setting(name)
            for param in unreached:
                param.requires_grad_(not frozen)
            trainer.model = DistributedDataParallel(module, **ddp)
            for _ in range(WARMUP_STEPS if round_index == 0 else STEPS_PER_ROUND):
                start = time.perf_counter()
                trainer.run_step()
                if round_index > 0:
                    times[name].append(time.perf_counter() - start)
            del trainer.model
    trainer.data.close()
    if comm.is_main():
        Path(out_path).write_text(json.dumps({"world_size": comm.world_size(), **times}))
    comm.barrier()
    comm.shutdown()


def main() -> None:
    bench = TrainBench(process_counts=(2,))
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-ddp-") as tmp:
        root = Path(tmp)
        overrides = [f"data.uri={_dataset(root / 'store', bench)}", f"output.store={root / 'store'}"]
        result = _launch(2, overrides, root / "times.json", bench, module="bench.bench_ddp")
    timed = ROUNDS * STEPS_PER_ROUND
    print(
        f"DDP settings, tiny preset (112 px, 2 clips x 2 frames per process), 2 gloo ranks, 1 torch thread each, "
        f"median of {timed} steps per setting in {ROUNDS} alternating rounds; {os.cpu_count()} CPUs"
    )
    after = statistics.median(result["after"])
    print(f"{'setting':<18}{'s/step':>10}{'vs after':>10}")
    for name in SETTINGS:
        median = statistics.median(result[name])
        print(f"{name:<18}{median:>10.3f}{median / after:>9.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
