"""MLflow tracking for sam3pipe: the only place in sam3_core that talks to MLflow.

A component opens its run with `component_run` (parent per pipeline run, nested run per
component, found again by tags), logs through the returned `Tracker`, and predict turns
`models:/<name>@candidate` into a checkpoint URI with `resolve_model_uri`.
"""

from sam3_core.tracking.metrics import (
    eval_metrics,
)
from sam3_core.tracking.redact import redact_params, redact_text, redact_tree
from sam3_core.tracking.registry import resolve_model_uri
from sam3_core.tracking.runs import TAG_COMPONENT, TAG_PIPELINE_RUN_ID
from sam3_core.tracking.settings import TrackingConfig, tracking_uri, ui_command
from sam3_core.tracking.tracker import Tracker, component_run
from sam3_core.tracking.unsent import replay_unsent
from sam3_core.tracking.visuals import draw_masks

__all__ = [
    "TAG_COMPONENT",
    "TAG_PIPELINE_RUN_ID",
    "Tracker",
    "TrackingConfig",
    "component_run",
    "draw_masks",
    "eval_metrics",
    "redact_params",
    "redact_text",
    "redact_tree",
    "replay_unsent",
    "resolve_model_uri",
    "tracking_uri",
    "ui_command",
]
