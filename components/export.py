"""Pipeline step: a fine-tuned detector in SAM3's own video checkpoint, logged and registered as the video model.

`python -m components.export model.uri=<checkpoint | models:/<name>@<alias>> base.uri=<sam3.pt>
output.uri=<file or s3 URI>` writes the fine-tuned `detector.*` with the base's `tracker.*` (and
the tracker's neck; a checkpoint of a tracker or joint run keeps its own), a checkpoint
`sam3.model_builder.build_sam3_video_model` loads strictly,
and prints {"video_model_uri", "video_model_sha256"} as one JSON line. The MLflow run logs it as a
logged model (with its sha256 and the sha256 of both sources) and registers it under
`mlflow.registered_model_name` (default `sam3-video-model`, beside the detector's `sam3-video`).
"""

from __future__ import annotations

import posixpath
import sys
from dataclasses import asdict, replace
from typing import Any

from components.runner import Usage, run_cli
from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.errors import InputError
from sam3_core.mlflow_records import component_run, resolve_model_uri
from sam3_core.model.export import ExportConfig, export_video_checkpoint

TAG_MODEL_URI = "sam3pipe.model_uri"
TAG_BASE_URI = "sam3pipe.base_uri"
TAG_VIDEO_MODEL_URI = "sam3pipe.video_model_uri"
TAG_VIDEO_MODEL_SHA256 = "sam3pipe.video_model_sha256"


def _existing(uri: str, key: str) -> None:
    if not storage.exists(uri):
        raise InputError(uri, key, "no such checkpoint; check the URI")


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config, check both sources, export, then log and register the export on rank 0.

    Every input is checked before the MLflow run opens; the output is written whole or not at all.
    """
    cfg = load_config("export", ExportConfig, overrides)
    if not cfg.model.uri:
        raise InputError("export config", "model.uri", "no checkpoint given; pass model.uri=<checkpoint URI>")
    model_uri = resolve_model_uri(cfg.model.uri, cfg=cfg.mlflow)
    _existing(model_uri, "model.uri")
    _existing(cfg.base.uri, "base.uri")
    cfg = replace(cfg, model=replace(cfg.model, uri=model_uri))
    folder = posixpath.dirname(cfg.output.uri.rstrip("/"))
    with component_run(cfg.mlflow, "export", cfg, overrides=overrides, output_uri=folder or None) as run:
        result = export_video_checkpoint(cfg, model_uri)
        ref = result.checkpoint
        run.set_tags(
            {
                TAG_MODEL_URI: model_uri,
                TAG_BASE_URI: cfg.base.uri,
                TAG_VIDEO_MODEL_URI: ref.uri,
                TAG_VIDEO_MODEL_SHA256: ref.sha256,
            }
        )
        record = {**asdict(result), "model_uri": model_uri, "base_uri": cfg.base.uri}
        run.log_json(record, "export.json")
        run.log_checkpoint("video", ref.uri, ref.step, ref.sha256, ref.size, role="best")
        run.register_model(ref.uri)
        outputs = {"video_model_uri": ref.uri, "video_model_sha256": ref.sha256}
        run.set_outputs(outputs)
    return outputs


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "export", ExportConfig))


if __name__ == "__main__":
    sys.exit(main())
