"""The demo (`make demo`): its metric table, wall and CPU time, where the time goes, and its spread over seeds.

Each run starts where a newcomer's first run starts, the venv built: a fresh store, MLflow database
and kfp.local pipeline root in a temporary folder. CPU time is user + system of the whole process
tree (`resource.getrusage(RUSAGE_CHILDREN)`): unlike wall time it hardly moves with other load on
the machine. Per component, the process tree is sampled every half second (psutil), which gives each
component's wall span and, to within that half second, its CPU time.

The demo runs `repeats` times as `make demo` runs it: the printed tables must be identical. Then once
per extra seed (`train.seed`, appended to the profile's training overrides): the spread of the
headline metrics over the seeds, and their margin over the demo's thresholds.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from sam3_core.pipeline_parameters import profile

REPO = Path(__file__).resolve().parents[1]
PROFILE = "demo"
# what the demo promises a newcomer (issue 23): every run clears these on the validation videos
THRESHOLDS = {"bbox_AP50": 0.6, "segm_AP50": 0.7}
HEADLINE = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50", "video_bbox_mAP_50", "video_mask_mAP_50_95")
_SAMPLE_S = 0.5
_TABLE_ROW = re.compile(r"^(\S+)\s+(-?\d+\.\d{4}|nan)$")


@dataclass
class DemoBench:
    # runs of the demo as it is (seed 0); their tables must be identical
    repeats: int = 2
    # further runs, one per seed, for the spread (seed 0 is the repeats')
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    timeout_s: int = 1800


@dataclass
class DemoRun:
    seed: int
    wall_s: float
    cpu_s: float
    table: str
    metrics: dict[str, float]
    # component -> (wall s, CPU s)
    components: dict[str, tuple[float, float]] = field(default_factory=dict)


def command(seed: int) -> list[str]:
    """`make demo`'s command; another seed appends `train.seed=N` to the profile's training overrides."""
    line = [sys.executable, "-m", "pipeline.cli", "run", "--local", f"profile={PROFILE}"]
    if seed:
        overrides = [*profile(PROFILE).get("train_overrides", []), f"train.seed={seed}"]
        line.append("train_overrides=[" + ",".join(f'"{o}"' for o in overrides) + "]")
    return line


def metric_table(stdout: str) -> tuple[str, dict[str, float]]:
    """The metric table the demo printed (its text, for comparing runs) and its values."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    rows = []
    for line in lines[start + 2 :]:
        if not _TABLE_ROW.match(line):
            break
        rows.append(line)
    metrics = {m.group(1): float(m.group(2)) for m in map(_TABLE_ROW.match, rows) if m}
    return "\n".join(lines[start : start + 2 + len(rows)]), metrics


def _component(process: psutil.Process) -> str:
    """The kfp.local component a process runs (its `--function_to_execute`), else "run" (the launcher)."""
    try:
        line = process.cmdline()
    except psutil.Error:
        return "run"
    if "--function_to_execute" in line:
        return line[line.index("--function_to_execute") + 1]
    return "run"


def run_demo(seed: int, root: Path, timeout_s: int) -> DemoRun:
    """One demo in its own store, MLflow database and pipeline root under `root`."""
    env = {
        **os.environ,
        "SAM3PIPE_STORE": str(root / "store"),
        "SAM3PIPE_HOME": str(root / "home"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    line = [*command(seed), "--pipeline-root", str(root / "kfp")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # to a file, not a pipe: the run prints more than a pipe holds, and would block until it is read
    printed = (root / "stdout.txt").open("w+", encoding="utf-8")
    proc = subprocess.Popen(line, cwd=REPO, env=env, stdout=printed, stderr=subprocess.DEVNULL, text=True)
    spans: dict[tuple[int, float], dict[str, Any]] = {}
    root_process = psutil.Process(proc.pid)
    while proc.poll() is None:
        now = time.perf_counter() - start
        try:
            tree = [root_process, *root_process.children(recursive=True)]
        except psutil.Error:
            tree = []
        for process in tree:
            try:
                times = process.cpu_times()
                key = (process.pid, process.create_time())
            except psutil.Error:
                continue
            span = spans.setdefault(key, {"component": _component(process), "first": now})
            span.update(cpu=times.user + times.system, last=now)
        if now > timeout_s:
            proc.kill()
            raise RuntimeError(f"the demo (seed {seed}) ran past {timeout_s} s")
        time.sleep(_SAMPLE_S)
    printed.seek(0)
    stdout = printed.read()
    printed.close()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"the demo (seed {seed}) failed with exit code {proc.returncode}")
    components: dict[str, tuple[float, float]] = {}
    for span in spans.values():
        first, last, cpu = span["first"], span["last"], span.get("cpu", 0.0)
        wall_then, cpu_then = components.get(span["component"], (0.0, 0.0))
        components[span["component"]] = (max(wall_then, last - first), cpu_then + cpu)
    table, metrics = metric_table(stdout)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return DemoRun(seed, wall, cpu_s, table, metrics, components)


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench demo", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DemoBench.repeats, help="runs of seed 0 (tables compared)")
    parser.add_argument(
        "--seeds", default=",".join(map(str, DemoBench.seeds)), help="further seeds, comma-separated ('' for none)"
    )
    options = parser.parse_args(argv or [])
    seeds = tuple(int(seed) for seed in options.seeds.split(",") if seed)
    bench = DemoBench(repeats=options.repeats, seeds=seeds)
    runs: list[DemoRun] = []
    for seed in [0] * bench.repeats + list(bench.seeds):
        with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-demo-") as tmp:
            runs.append(run_demo(seed, Path(tmp), bench.timeout_s))
    print(
        f"`make demo` (profile={PROFILE}), {bench.repeats} runs as is and one per seed {list(bench.seeds)}, each from a"
    )
    print(f"fresh store and MLflow database; {os.cpu_count()} CPUs; CPU = user + system of the process tree")
    print(f"{'run':<8}{'seed':>5}{'wall s':>9}{'CPU s':>8}" + "".join(f"{name:>22}" for name in HEADLINE))
    for index, run in enumerate(runs):
        values = "".join(f"{run.metrics.get(name, float('nan')):>22.4f}" for name in HEADLINE)
        print(f"{index + 1:<8}{run.seed:>5}{run.wall_s:>9.1f}{run.cpu_s:>8.1f}{values}")
    repeats = runs[: bench.repeats]
    same = all(run.table == repeats[0].table for run in repeats)
    print(f"\nthe {bench.repeats} runs of seed 0 printed {'the same table' if same else 'DIFFERENT tables'}")
    print(
        f"median of those runs: wall {statistics.median(r.wall_s for r in repeats):.1f} s, "
        f"CPU {statistics.median(r.cpu_s for r in repeats):.1f} s"
    )
    by_seed = [repeats[0], *runs[bench.repeats :]]
    print(f"over {len(by_seed)} seeds (min / median / max), margin = min - threshold:")
    for name in HEADLINE:
        values = [run.metrics[name] for run in by_seed if name in run.metrics]
        margin = (
            f"   margin {min(values) - THRESHOLDS[name]:+.3f} over {THRESHOLDS[name]}" if name in THRESHOLDS else ""
        )
        print(f"  {name:<24}{_spread(values)}{margin}")
    print("\nwhere the first run's time went (component: wall s, CPU s, sampled every 0.5 s):")
    for name, (wall, cpu) in sorted(runs[0].components.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<24}{wall:>8.1f}{cpu:>8.1f}")
    print(f"\nthe first run's table:\n{runs[0].table}")


if __name__ == "__main__":
    main()
