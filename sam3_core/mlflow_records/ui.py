"""Links into MLflow's UI that open on what a comparison needs.

MLflow 3.17's UI picks the model-training navigation from the URL (`workflowType=
machine_learning`, remembered afterwards) and restores a runs-table view (selected columns,
order) from an experiment tag `mlflow.sharedViewState.<key>` named in the URL as
`viewStateShareKey=<key>` (the UI's own "share view" mechanism). Every experiment we create
carries such a view with the parent-run params and headline metrics as columns, so
`runs_table_url` opens the runs table with those columns shown.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import quote

from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.settings import MlflowConfig, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

VIEW_KEY = "sam3pipe-headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MODEL_TRAINING = "workflowType=machine_learning"
# The runs table's own attribute columns, kept next to ours.
ATTRIBUTE_COLUMNS = ("Dataset", "Models")
# Lineage params every pipeline run carries (see tracker.LINEAGE_PARAMS and set_dataset_id).
LINEAGE_COLUMNS = ("dataset_id", "image", "git_commit")


def _column(kind: str, name: str) -> str:
    """A column as the UI names it (its `makeCanonicalSortKey`)."""
    return f"{kind}.`{name}`"


def headline_view(cfg: MlflowConfig) -> dict[str, object]:
    """The runs-table view: comparison params, headline metrics, then lineage; newest runs first."""
    columns = [
        *(_column("attributes", name) for name in ATTRIBUTE_COLUMNS),
        *(_column("params", name) for name in cfg.parent_params),
        *(_column("metrics", name) for name in dict.fromkeys([*cfg.headline_metrics, "best_step"])),
        *(_column("params", name) for name in LINEAGE_COLUMNS),
    ]
    # Without an order the grid puts every metric column before the params, sorted by name.
    return {
        "selectedColumns": columns,
        "columnOrder": columns,
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def view_tags(cfg: MlflowConfig) -> dict[str, str]:
    """Experiment tags that store the headline view."""
    return {VIEW_TAG: json.dumps(headline_view(cfg))}


def publish_view(client: MlflowClient, experiment_id: str, cfg: MlflowConfig) -> None:
    """Store (or refresh) the headline view on an experiment."""
    for key, value in view_tags(cfg).items():
        client.set_experiment_tag(experiment_id, key, value)


def runs_table_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs table, model-training navigation, headline columns shown."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING}&viewStateShareKey={VIEW_KEY}"


def compare_url(base_url: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of `run_ids` (params and metrics side by side)."""
    runs = quote(json.dumps(run_ids))
    experiments = quote(json.dumps([experiment_id]))
    return f"{base_url.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}&{MODEL_TRAINING}"


def local_runs_table_url(port: int, cfg: MlflowConfig | None = None) -> str:
    """The runs-table link of `sam3pipe ui` on the local store, its headline view (re)published.

    Without runs yet, the experiments list.
    """
    cfg = cfg or MlflowConfig()
    base = f"http://127.0.0.1:{port}"
    client = mlflow_api.MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    if experiment is None:
        return f"{base}/#/experiments?{MODEL_TRAINING}"
    publish_view(client, experiment.experiment_id, cfg)
    return runs_table_url(base, experiment.experiment_id)
