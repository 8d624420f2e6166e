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

from sam3_core.mlflow_records import MlflowConfig, component_run

REPEATS = 5
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
    cfg = MlflowConfig(experiment_name=f"bench-{uuid.uuid4().hex[:8]}", **settings)  # type: ignore[arg-type]
    _bookkeeping_s(cfg, files)  # warm-up: experiment creation, imports
    times = [_bookkeeping_s(cfg, files) for _ in range(REPEATS)]
    median = statistics.median(times)
    print(f"| {label:<46} | {median:8.3f} | {max(times):8.3f} |")
    return median


def main() -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-tracking-") as tmp:
        root = Path(tmp)
        files = _report_files(root)
        server, url = _start_server(root)
        try:
            print(f"evaluate-shaped run, {len(files) + 2} artifacts, median of {REPEATS} (s, after the work)")
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
