"""The local record of values that never reached the tracking server, and its replay.

The record is JSON Lines next to the component's outputs (in the object store, so it
survives the pod): sections, each a `run` line (the run id, or how to find the run when
the server was down from the start) followed by its metric / param / tag lines and its
tracking records (checkpoints, registrations, datasets, parent values; see records.py).
`python -m sam3_core.mlflow_records replay <uri>` sends it once the server is back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sam3_core import storage
from sam3_core.errors import InputError, Sam3PipeError
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.records import Target, apply_record, describe_pending
from sam3_core.mlflow_records.redact import describe_error, redact_text
from sam3_core.mlflow_records.runs import OpenRuns, RunSpec, close_runs, open_runs
from sam3_core.mlflow_records.sender import Pending, is_transient, tracking_errors
from sam3_core.mlflow_records.settings import (
    MlflowConfig,
    fail_fast_http,
    is_local_store,
    local_artifact_root,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

UNSENT_FILE = "mlflow_unsent.jsonl"


@dataclass
class Section:
    """One component run's unsent values."""

    header: dict[str, Any]
    pending: Pending = field(default_factory=Pending)
    records: list[dict[str, Any]] = field(default_factory=list)


def _lines(
    spec: RunSpec, run_id: str | None, status: str, pending: Pending, records: list[dict[str, Any]], owned: bool
) -> list[dict[str, Any]]:
    header = {"kind": "run", "run_id": run_id, "status": status, "spec": asdict(spec), "owned": owned}
    lines: list[dict[str, Any]] = [header]
    lines += [
        {"kind": "metric", "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
        for m in pending.metrics
    ]
    lines += [{"kind": "param", "key": p.key, "value": p.value} for p in pending.params]
    lines += [{"kind": "tag", "key": t.key, "value": t.value} for t in pending.tags]
    lines += [{"kind": "record", "record": record} for record in records]
    return lines


def record_unsent(
    uri: str,
    spec: RunSpec,
    run_id: str | None,
    status: str,
    pending: Pending,
    records: list[dict[str, Any]] | None = None,
    owned: bool = True,
) -> None:
    """Append a section to the record at `uri` (a run may be recorded more than once).

    `owned` is False for a run someone else owns (KFP's): replay then logs into it without ending it.
    """
    text = "".join(json.dumps(line) + "\n" for line in _lines(spec, run_id, status, pending, records or [], owned))
    earlier = storage.read_text(uri) if storage.exists(uri) else ""
    storage.write_text(uri, earlier + text)


def _sections(uri: str, text: str) -> list[Section]:
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            line = json.loads(raw)
            kind = line["kind"]
            if kind == "run":
                sections.append(Section(line))
            elif not sections:
                raise KeyError("run")
            elif kind == "metric":
                metric = mlflow_api.Metric(line["key"], float(line["value"]), int(line["timestamp"]), int(line["step"]))
                sections[-1].pending.metrics.append(metric)
            elif kind in ("param", "tag"):
                target = sections[-1].pending.params if kind == "param" else sections[-1].pending.tags
                target.append(
                    (mlflow_api.Param if kind == "param" else mlflow_api.RunTag)(line["key"], str(line["value"]))
                )
            elif kind == "record" and isinstance(line["record"], dict) and "kind" in line["record"]:
                sections[-1].records.append(line["record"])
            else:
                raise KeyError(kind)
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(uri, f"line {number}", f"not a tracking record line ({exc}); was it edited?") from None
    return sections


def _open(client: MlflowClient, header: dict[str, Any]) -> OpenRuns | None:
    """Runs of a section recorded while offline are opened now, exactly as the component would have."""
    if header["run_id"]:
        return None
    artifact_location = local_artifact_root() if is_local_store(tracking_uri()) else None
    return open_runs(client, RunSpec(**header["spec"]), artifact_location)


def _target(client: MlflowClient, run_id: str) -> Target:
    run = client.get_run(run_id)
    return Target(run.info.experiment_id, run.data.tags.get(mlflow_api.MLFLOW_PARENT_RUN_ID, run_id), run_id)


def replay_unsent(uri: str, client: MlflowClient | None = None) -> int:
    """Send every recorded value and record to its run; remove the record when all arrived.

    A record the server refuses (not a transient failure) does not leave its runs RUNNING: the others
    are sent, the runs end with their recorded status, the refused records stay in the file, and the
    replay fails naming them. Returns the metric count.
    """
    sections = _sections(uri, storage.read_text(uri))
    fail_fast_http(MlflowConfig())
    client = client or mlflow_api.MlflowClient(tracking_uri())
    sent = 0
    refused: list[tuple[Section, str, dict[str, Any], str]] = []
    try:
        for section in sections:
            header, pending = section.header, section.pending
            opened = _open(client, header)
            run_id = opened.run_id if opened else header["run_id"]
            for batch in pending.batches():
                client.log_batch(run_id, metrics=batch.metrics, params=batch.params, tags=batch.tags)
            target = _target(client, run_id)
            for record in section.records:
                try:
                    apply_record(client, target, record)
                except tracking_errors() as exc:
                    if is_transient(exc):
                        raise
                    refused.append((section, run_id, record, describe_error(exc)))
            if opened:
                close_runs(client, opened, header["status"])
            elif header.get("owned", True) and client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, header["status"])
            sent += len(pending.metrics)
    except tracking_errors() as exc:
        hint = "retry when it is reachable" if is_transient(exc) else "it refused them"
        raise Sam3PipeError(
            f"{uri}: replay to {redact_text(tracking_uri())} stopped: {describe_error(exc)}; {hint}"
        ) from exc
    storage.delete(uri)
    if refused:
        for section, run_id, record, _ in refused:
            spec = RunSpec(**section.header["spec"])
            record_unsent(uri, spec, run_id, section.header["status"], Pending(), [record])
        first = refused[0]
        raise Sam3PipeError(
            f"{uri}: the tracking server at {redact_text(tracking_uri())} refused "
            f"{describe_pending([r for _, _, r, _ in refused])} "
            f"({first[3]}); the other values were sent and the runs ended, the refused ones are kept in {uri}"
        )
    logger.info("replayed %d metrics from %s; record removed", sent, uri)
    return sent
