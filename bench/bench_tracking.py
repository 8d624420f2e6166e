"""MLflow bookkeeping of a short component, after its work is done, side by side in one process.

An evaluate-shaped run (its metrics, four report files, the per-category table, a summary, its
outputs tag) is closed against a real `mlflow server` on loopback and against the local sqlite
store, with system metrics on and off and with 1 or 4 upload threads. The time measured is
from the end of the work to `finish()` returning: what the component adds on top of its work.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from bench.bench_evaluate import EvaluateBench
from sam3_core.mlflow_records import MlflowConfig, component_run
from tests.fixtures.saco import generate

REPO = Path(__file__).resolve().parents[1]
REPEATS = 5
CLI_REPEATS = 5
CLI_ROWS = {
    "untracked (mlflow.enabled=false)": ["mlflow.enabled=false"],
    "tracked, helper process (default)": [],
    "tracked, in-process (mlflow.background=false)": ["mlflow.background=false"],
}
METRICS = {f"{kind}_{name}": 0.25 for kind in ("bbox", "segm") for name in ("AP", "AP50", "AP75", "AR100")}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        *("server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}"),
        *("--artifacts-destination", (root / "server-artifacts").as_uri()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("mlflow server did not start")


def _report_files(root: Path) -> list[str]:
    """Files shaped like evaluate's: small text tables and a PNG-sized binary plot."""
    rows = "".join(f"category_{i},0.{i:04d},0.{i:04d},0.{i:04d}\n" for i in range(200))
    contents = {
        "metrics.json": json.dumps(METRICS, indent=2).encode(),
        "per_category.csv": ("category,AP,AP50,AP75\n" + rows).encode(),
        "per_category.md": ("| category | AP | AP50 | AP75 |\n" + rows.replace(",", " | ")).encode(),
        "pr_curves.png": random.Random(0).randbytes(60_000),
    }
    files = []
    for name, data in contents.items():
        (root / name).write_bytes(data)
        files.append(str(root / name))
    return files


def _cli_s(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (the helper process included) of one evaluate CLI, start to exit."""
    start = time.perf_counter()
    before = os.times()
    done = subprocess.run(
        [sys.executable, "-m", "components.evaluate", *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode:
        raise RuntimeError(f"evaluate CLI failed:\n{done.stderr[-3000:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def _cli_rows(root: Path) -> None:
    bench = EvaluateBench()
    gt, predictions = generate(bench.one_video)
    gt_path, pred_path = root / "one_gt.json", root / "one_pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(predictions[: bench.one_video_predictions]))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SAM3PIPE_STORE": str(root / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'cli.db'}",
        "MLFLOW_EXPERIMENT_NAME": "bench-cli",
    }

    def args(name: str, i: int) -> list[str]:
        output = root / "cli" / f"{len(name)}-{i}" / "metrics.json"
        return ["--gt", str(gt_path), "--predictions", str(pred_path), "--output", str(output), *CLI_ROWS[name]]

    _cli_s(args("tracked, helper process (default)", -1), env)  # the store exists before any timed run
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in CLI_ROWS}
    for i in range(CLI_REPEATS):
        for name in CLI_ROWS:
            times[name].append(_cli_s(args(name, i), env))
    print(
        f"evaluate CLI, start to exit, one SA-Co-shaped video ({len(gt['categories'])} phrases), existing local sqlite "
        f"store, {CLI_REPEATS} interleaved runs (s)"
    )
    print(f"| {'run':<46} | {'wall min':>8} | {'wall med':>8} | {'CPU med':>8} |")
    print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, rows in times.items():
        walls, cpus = [w for w, _ in rows], [c for _, c in rows]
        print(f"| {name:<46} | {min(walls):8.2f} | {statistics.median(walls):8.2f} | {statistics.median(cpus):8.2f} |")
    untracked = statistics.median(w for w, _ in times["untracked (mlflow.enabled=false)"])
    helper = statistics.median(w for w, _ in times["tracked, helper process (default)"])
    inline = statistics.median(w for w, _ in times["tracked, in-process (mlflow.background=false)"])
    print(
        f"tracked / untracked (median wall): helper process {helper / untracked:.2f}x, in-process {inline / untracked:.2f}x"
    )


def _bookkeeping_s(cfg: MlflowConfig, files: list[str]) -> float:
    """Seconds from the end of the work to `finish()` returning."""
    run = component_run(cfg, "evaluate", {"gt": "val.json", "mlflow": {"flush_interval_s": cfg.flush_interval_s}})
    time.sleep(0.2)  # the work
    start = time.perf_counter()
    run.log_eval(METRICS)
    for uri in files:
        run.log_file(uri)
    run.log_table([{"category": f"c{i}", "AP": 0.5} for i in range(20)], "per_category.json")
    run.log_summary("evaluation", {name: f"{value:.4f}" for name, value in METRICS.items()})
    run.set_outputs({"metrics_uri": files[0]})
    run.finish()
    return time.perf_counter() - start


def _row(label: str, uri: str, files: list[str], **settings: object) -> float:
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # in-process: the time of the bookkeeping itself, not of a helper process still opening the runs
    cfg = MlflowConfig(experiment_name=f"bench-{uuid.uuid4().hex[:8]}", background=False, **settings)  # type: ignore[arg-type]
    _bookkeeping_s(cfg, files)  # warm-up: experiment creation, imports
    times = [_bookkeeping_s(cfg, files) for _ in range(REPEATS)]
    median = statistics.median(times)
    print(f"| {label:<46} | {median:8.3f} | {max(times):8.3f} |")
    return median


def main() -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-tracking-") as tmp:
        root = Path(tmp)
        _cli_rows(root)
        files = _report_files(root)
        server, url = _start_server(root)
        try:
            print(f"\nevaluate-shaped run, {len(files) + 2} artifacts, median of {REPEATS} (s, after the work)")
            print(f"| {'store / settings':<46} | {'median':>8} | {'max':>8} |")
            print(f"|{'-' * 48}|{'-' * 10}|{'-' * 10}|")
            on = _row("server, system metrics on, 4 upload threads", url, files, system_metrics=True)
            off = _row("server, system metrics off, 4 upload threads", url, files, system_metrics=False)
            serial = _row(
                "server, system metrics on, 1 upload thread", url, files, system_metrics=True, upload_workers=1
            )
            local = f"sqlite:///{root / 'local.db'}"
            _row("local sqlite, system metrics on", local, files, system_metrics=True)
            _row("local sqlite, system metrics off", local, files, system_metrics=False)
            print(f"system metrics on / off: {on / off:.2f}x; 1 / 4 upload threads: {serial / on:.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=60)
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before
