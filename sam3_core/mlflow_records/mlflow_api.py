"""mlflow's names, imported on first use.

Importing mlflow takes about a second (it pulls in pandas, pydantic and FastAPI). A component run
with `mlflow.enabled=false`, or a predict that reads a plain checkpoint URI, must not pay that.
The tracking modules call mlflow through this module (`mlflow_api.MlflowClient(uri)`) and import
mlflow's names at their top for type checking only.
"""

from __future__ import annotations

from sam3_core.lazy import lazy_attributes

_SOURCES = {
    "MlflowClient": "mlflow",
    "Dataset": "mlflow.entities",
    "DatasetInput": "mlflow.entities",
    "InputTag": "mlflow.entities",
    "LoggedModelOutput": "mlflow.entities",
    "Metric": "mlflow.entities",
    "Param": "mlflow.entities",
    "RunStatus": "mlflow.entities",
    "RunTag": "mlflow.entities",
    "MlflowException": "mlflow.exceptions",
    "MLFLOW_DATASET_CONTEXT": "mlflow.utils.mlflow_tags",
    "MLFLOW_GIT_COMMIT": "mlflow.utils.mlflow_tags",
    "MLFLOW_PARENT_RUN_ID": "mlflow.utils.mlflow_tags",
    "MAX_METRICS_PER_BATCH": "mlflow.utils.validation",
    "MAX_PARAMS_TAGS_PER_BATCH": "mlflow.utils.validation",
}
__all__ = sorted(_SOURCES)
__getattr__ = lazy_attributes(__name__, _SOURCES)
