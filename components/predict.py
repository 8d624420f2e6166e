"""The predict component: predictions of a checkpoint on a dataset split, in COCO and YTVIS formats.

`python -m components.predict model.uri=<checkpoint or models:/<name>@candidate> data.uri=<dataset_uri>`
(or under `torchrun --nproc_per_node N`) prints {"predictions_uri"} as one JSON line. The MLflow run
records the checkpoint it used, where the predictions went, and a few frames with their masks.
"""

from __future__ import annotations

import sys
from typing import Any

from components.runner import Usage, run_cli
from sam3_core.comm import shutdown
from sam3_core.config import load_config
from sam3_core.data.frames import FrameReader
from sam3_core.mlflow_records import component_run
from sam3_core.predict.predictor import (
    PredictConfig,
    fetched_checkpoint,
    predict,
    prepare_output,
    with_resolved_model,
)

TAG_MODEL_URI = "sam3pipe.model_uri"
TAG_PREDICTIONS_URI = "sam3pipe.predictions_uri"


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config, resolve the model, predict and dump; track the run on rank 0.

    Every input is checked (dataset, checkpoint, a free output folder) before the MLflow run opens.
    """
    requested = load_config("predict", PredictConfig, overrides)
    cfg = with_resolved_model(requested)
    FrameReader(cfg.data.uri, cfg.data.cache_dir)  # a clear error before any work when the dataset is not there
    try:
        with fetched_checkpoint(cfg.model.uri) as checkpoint:
            out_uri = prepare_output(cfg, checkpoint)
            with component_run(
                cfg.mlflow, "predict", cfg, overrides=overrides, dataset_uri=cfg.data.uri, output_uri=out_uri
            ) as run:
                run.set_tags({TAG_MODEL_URI: requested.model.uri})
                result = predict(cfg, checkpoint)
                run.set_tags({TAG_PREDICTIONS_URI: result.predictions_uri})
                run.set_outputs({"predictions_uri": result.predictions_uri})
                for name, image in result.previews.items():
                    run.log_image(image, f"previews/{name}.png")
    finally:
        shutdown()
    return {"predictions_uri": result.predictions_uri}


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "predict", PredictConfig))


if __name__ == "__main__":
    sys.exit(main())
