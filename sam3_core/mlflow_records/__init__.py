"""MLflow tracking for sam3pipe: the only place in sam3_core that talks to MLflow.

A component opens its run with `component_run` (parent per pipeline run, nested run per
component, found again by tags), logs through the returned `ComponentRun`, and predict turns
`models:/<name>@candidate` into a checkpoint URI with `resolve_model_uri`. Checkpoints are
LoggedModels (models.py), datasets are dataset inputs (datasets.py), and what a run needs to
be reproduced is its `reproduce.json` (lineage.py; `sam3pipe reproduce` reads it).

Names resolve lazily (PEP 562): configs embed `MlflowConfig` without importing mlflow, which
costs seconds at the start of every training process.
"""

from __future__ import annotations

from sam3_core.lazy import lazy_attributes

_SOURCES = {
    "DatasetRef": "datasets",
    "eval_metrics": "metrics",
    "git_commit": "lineage",
    "lineage_tags": "lineage",
    "redact_params": "redact",
    "redact_text": "redact",
    "redact_tree": "redact",
    "resolve_model_uri": "registry",
    "TAG_COMPONENT": "runs",
    "TAG_PIPELINE_RUN_ID": "runs",
    "MlflowConfig": "settings",
    "tracking_uri": "settings",
    "ui_command": "settings",
    "compare_url": "ui",
    "local_runs_table_url": "ui",
    "runs_table_url": "ui",
    "ComponentRun": "component_runs",
    "component_run": "component_runs",
    "replay_unsent": "unsent",
    "draw_masks": "visuals",
}
__all__ = sorted(_SOURCES)
__getattr__ = lazy_attributes(__name__, {name: f"{__name__}.{source}" for name, source in _SOURCES.items()})
