"""The train component: fine-tune the SAM3 detector (or, with `train.stage`, its tracker) on video clips, tracked in MLflow.

One process, `torchrun --nproc_per_node N -m components.train ...`, or a PyTorchJob: the launcher's
environment decides. Rerunning the same command resumes from the run's `last.pt`, and its MLflow
run lands under the same parent. `python -m components.train data.uri=<dataset_uri> model=tiny
train.max_steps=50` prints {"run_uri", "best_checkpoint_uri", "last_checkpoint_uri"} as one JSON line.
"""

from __future__ import annotations

import posixpath
import re
import sys
from dataclasses import replace
from typing import Any
from urllib.parse import urlparse

from components.runner import Usage, run_cli
from sam3_core import storage
from sam3_core.comm import shutdown
from sam3_core.config import load_config
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import MANIFEST
from sam3_core.errors import ConfigError, Sam3PipeError
from sam3_core.mlflow_records import ComponentRun, component_run, redact_text, tracking_uri
from sam3_core.model.checkpoint import CheckpointRef
from sam3_core.train.build import train
from sam3_core.train.config import TrainConfig
from sam3_core.train.run import RunFolder, run_uri_for
from sam3_core.train.trainer import TrainResult

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:@-]+")
TAG_BEST_METRIC = "sam3pipe.best_metric"
TAG_BEST_STEP = "sam3pipe.best_step"


def grouped_by_run_folder(cfg: TrainConfig, run_uri: str) -> TrainConfig:
    """Without a pipeline run id, the run folder names the parent run, so a rerun finds it again."""
    if cfg.mlflow.pipeline_run_id:
        return cfg
    folder_id = _UNSAFE_ID.sub("-", posixpath.basename(run_uri.rstrip("/")))
    return replace(cfg, mlflow=replace(cfg.mlflow, pipeline_run_id=folder_id))


def component_name(cfg: TrainConfig) -> str:
    """The MLflow component of the run: `train` for the detector, `train_tracker` / `train_joint` for the other
    stages, so a pipeline that trains the tracker after the detector gets a second run, with its own logged models."""
    return "train" if cfg.train.stage == "detector" else f"train_{cfg.train.stage}"


def check_registrable(cfg: TrainConfig, run_uri: str) -> None:
    """The best checkpoint is registered at the end: a tracking server cannot take a checkpoint that only
    this machine's disk holds (MLflow refuses local paths as model sources), which is known up front."""
    uri = tracking_uri()
    if not cfg.mlflow.enabled or storage.is_remote(run_uri) or urlparse(uri).scheme not in ("http", "https"):
        return
    raise ConfigError(
        f"output.store={cfg.output.store}: the run's checkpoints would stay on this machine's disk, and the "
        f"tracking server at {redact_text(uri)} cannot register a model there (it refuses local paths); write runs "
        "to an object store both reach (output.store=s3://...), track locally (unset MLFLOW_TRACKING_URI), or set "
        "mlflow.enabled=false"
    )


def log_history(run: ComponentRun, result: TrainResult, logged_steps: set[int]) -> None:
    """Metrics of steps trained before this process (a resumed training) that this MLflow run lacks."""
    if run.resumed:
        return
    for record in result.history:
        step = int(record["step"])
        if step not in logged_steps:
            run.log_metrics({name: value for name, value in record.items() if name != "step"}, step)


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config, train (rank 0 tracks metrics and checkpoints), register the best checkpoint.

    best.pt is the weights of the step where `train.best_metric` was best (LoRA adapters merged):
    the registered model. Its metric name and step are tagged on the run.
    """
    cfg = load_config("train", TrainConfig, overrides)
    folder = RunFolder(run_uri_for(cfg))
    cfg = grouped_by_run_folder(cfg, folder.uri)
    FrameReader(cfg.data.uri, cfg.data.cache_dir)  # a clear error before any work when the dataset is not there
    check_registrable(cfg, folder.uri)
    logged_steps: set[int] = set()
    try:
        with component_run(
            cfg.mlflow, component_name(cfg), cfg, overrides=overrides, dataset_uri=cfg.data.uri, output_uri=folder.uri
        ) as run:
            run.log_file(storage.join(cfg.data.uri, MANIFEST), "dataset")

            def on_metrics(step: int, metrics: dict[str, float]) -> None:
                logged_steps.add(step)
                run.log_metrics(metrics, step)

            def on_checkpoint(kind: str, ref: CheckpointRef) -> None:
                run.log_checkpoint_ref(kind, ref)

            result = train(cfg, on_metrics, on_checkpoint, run=folder)
            log_history(run, result, logged_steps)
            run.set_tags({TAG_BEST_METRIC: result.best_metric, TAG_BEST_STEP: result.best_step})
            registered = run.register_model(result.best_checkpoint_uri)
            if registered is None and run.run_id and not any(r.get("kind") == "register" for r in run.pending):
                raise Sam3PipeError(
                    f"train: the run finished ({result.best_checkpoint_uri}) but MLflow refused to register it as "
                    f"{cfg.mlflow.registered_model_name} (the warning above says why); rerun the same command once "
                    "that is fixed: it resumes the finished run and registers it"
                )
            outputs = {
                "run_uri": result.run_uri,
                "best_checkpoint_uri": result.best_checkpoint_uri,
                "last_checkpoint_uri": result.last_checkpoint_uri,
            }
            run.set_outputs(outputs)
    finally:
        shutdown()
    return outputs


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "train", TrainConfig))


if __name__ == "__main__":
    sys.exit(main())
