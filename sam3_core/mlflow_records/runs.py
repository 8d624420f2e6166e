"""Parent and component runs, found again by tags rather than remembered.

A pipeline run owns one parent run (tag `sam3pipe.component=pipeline`); every component
opens a nested run under it. Both are looked up by `sam3pipe.pipeline_run_id`, so a
component rerun locally or by KFP lands under the same parent.

Rerun rule: a component run that did not finish (crash, KFP retry, resumed training) and
has the same resolved config (tag `sam3pipe.config_sha256`) is resumed, so its curves go
on. Any other rerun gets a fresh nested run, and the earlier runs of that component under
the parent are tagged `sam3pipe.superseded_by` and soft-deleted (`mlflow runs restore
--run-id ...` brings one back): the parent always shows one run per component.

Runs someone else owns (KFP 2.17's backend: a parent per pipeline run, a nested run per task,
MLFLOW_RUN_ID naming the task's) are adopted instead: tagged like ours so the runs table,
`reproduce` and sweeps find them, logged into, and never reopened, replaced or ended here; KFP's
launcher ends the task's run and its API server the parent (KEP-12862).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sam3_core.mlflow_records import mlflow_api

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

TAG_PIPELINE_RUN_ID = "sam3pipe.pipeline_run_id"
TAG_COMPONENT = "sam3pipe.component"
TAG_CONFIG_SHA256 = "sam3pipe.config_sha256"
TAG_SUPERSEDED_BY = "sam3pipe.superseded_by"
TAG_SWEEP_ID = "sam3pipe.sweep_id"
PIPELINE = "pipeline"
SWEEP = "sweep"
# MLflow 3's experiment kind: the UI opens a model-training experiment on its runs table
# (values from the UI's ExperimentKind enum, mlflow 3.17).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


@dataclass(frozen=True)
class RunSpec:
    """What identifies a component run; stored with unsent metrics so they find their run later."""

    experiment_name: str
    pipeline_run_id: str
    pipeline_run_name: str
    component: str
    config_sha256: str
    # Lineage shared by the parent and the component run: git commit, image, sam3 version, dataset.
    tags: dict[str, str] = field(default_factory=dict)
    # A sweep's trial: the parent is created nested under the sweep's run.
    sweep_id: str = ""

    @property
    def parent_name(self) -> str:
        return self.pipeline_run_name or f"pipeline-{self.pipeline_run_id}"


@dataclass(frozen=True)
class OpenRuns:
    """Ids of the runs a component logs to."""

    experiment_id: str
    parent_run_id: str
    run_id: str
    resumed: bool
    # Params the parent already holds: MLflow refuses to change a param, so these are not resent.
    parent_params: dict[str, str] = field(default_factory=dict)
    # False for runs someone else owns (adopt_runs): they are not ended here.
    owned: bool = True
    # The pipeline run they belong to (`sam3pipe.pipeline_run_id`).
    pipeline_run_id: str = ""


def experiment_id(
    client: MlflowClient, name: str, artifact_location: str | None, tags: dict[str, str] | None = None
) -> str:
    """Id of the named experiment, created as a model-training experiment (or restored) when needed.

    An existing experiment without a kind gets ours (one a user gave another kind keeps it);
    `tags` (the UI's saved views) are set where they differ.
    """
    wanted = {TAG_EXPERIMENT_KIND: MODEL_TRAINING, **(tags or {})}
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=wanted)
        except mlflow_api.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        logger.warning("MLflow experiment %r was deleted; restoring it to log into it", name)
        client.restore_experiment(experiment.experiment_id)
    for key, value in wanted.items():
        held = experiment.tags.get(key)
        if held is None or (held != value and key != TAG_EXPERIMENT_KIND):
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def search_by_tags(client: MlflowClient, exp_id: str, tags: Mapping[str, str], newest_first: bool = False) -> list[Run]:
    """The experiment's runs carrying every one of `tags`, oldest (or newest) first."""
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    order = "DESC" if newest_first else "ASC"
    return client.search_runs([exp_id], query, order_by=[f"attributes.start_time {order}"])


def find_or_create(client: MlflowClient, exp_id: str, wanted: dict[str, str], tags: dict[str, str], name: str) -> Run:
    """The oldest run with the `wanted` tags; created when there is none (two racing creators: the oldest wins)."""
    found = search_by_tags(client, exp_id, wanted, newest_first=False)
    if not found:
        created = client.create_run(exp_id, tags={**tags, **wanted}, run_name=name)
        found = search_by_tags(client, exp_id, wanted, newest_first=False)
        if found[0].info.run_id != created.info.run_id:
            client.delete_run(created.info.run_id)
    return found[0]


def sweep_run_name(sweep_id: str) -> str:
    return f"sweep-{sweep_id}"


def sweep_run_id(client: MlflowClient, exp_id: str, sweep_id: str) -> str:
    """The sweep's run, found by its tags (created if the trials start before the sweep's run is opened)."""
    wanted = {TAG_SWEEP_ID: sweep_id, TAG_COMPONENT: SWEEP}
    return find_or_create(client, exp_id, wanted, {}, sweep_run_name(sweep_id)).info.run_id


def _sweep_tags(client: MlflowClient, exp_id: str, spec: RunSpec) -> dict[str, str]:
    """Tags that nest a trial's parent run under its sweep's run; none outside a sweep."""
    if not spec.sweep_id:
        return {}
    return {TAG_SWEEP_ID: spec.sweep_id, mlflow_api.MLFLOW_PARENT_RUN_ID: sweep_run_id(client, exp_id, spec.sweep_id)}


def _parent_run(client: MlflowClient, exp_id: str, spec: RunSpec) -> Run:
    """The pipeline run's parent; when two components race to create it, the oldest wins."""
    wanted = {TAG_PIPELINE_RUN_ID: spec.pipeline_run_id, TAG_COMPONENT: PIPELINE}
    parent = find_or_create(
        client, exp_id, wanted, {**spec.tags, **_sweep_tags(client, exp_id, spec)}, spec.parent_name
    )
    if parent.info.status != mlflow_api.RunStatus.to_string(mlflow_api.RunStatus.RUNNING):
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent


def open_runs(
    client: MlflowClient,
    spec: RunSpec,
    artifact_location: str | None = None,
    experiment_tags: dict[str, str] | None = None,
) -> OpenRuns:
    """Find or create the parent, then resume or replace the component run (see module doc)."""
    exp_id = experiment_id(client, spec.experiment_name, artifact_location, experiment_tags)
    parent = _parent_run(client, exp_id, spec)
    parent_id, parent_params = parent.info.run_id, dict(parent.data.params)
    earlier = search_by_tags(
        client, exp_id, {mlflow_api.MLFLOW_PARENT_RUN_ID: parent_id, TAG_COMPONENT: spec.component}, newest_first=True
    )
    if earlier:
        latest = earlier[0]
        unfinished = latest.info.status != mlflow_api.RunStatus.to_string(mlflow_api.RunStatus.FINISHED)
        if unfinished and latest.data.tags.get(TAG_CONFIG_SHA256) == spec.config_sha256:
            client.update_run(latest.info.run_id, status="RUNNING")
            logger.info("resuming MLflow run %s of %s", latest.info.run_id, spec.component)
            return OpenRuns(
                exp_id,
                parent_id,
                latest.info.run_id,
                resumed=True,
                parent_params=parent_params,
                pipeline_run_id=spec.pipeline_run_id,
            )
    tags = {
        **spec.tags,
        TAG_PIPELINE_RUN_ID: spec.pipeline_run_id,
        TAG_COMPONENT: spec.component,
        TAG_CONFIG_SHA256: spec.config_sha256,
        mlflow_api.MLFLOW_PARENT_RUN_ID: parent_id,
    }
    run = client.create_run(exp_id, tags=tags, run_name=f"{spec.parent_name}/{spec.component}")
    for old in earlier:
        client.set_tag(old.info.run_id, TAG_SUPERSEDED_BY, run.info.run_id)
        client.delete_run(old.info.run_id)
        logger.info("MLflow run %s of %s superseded by %s", old.info.run_id, spec.component, run.info.run_id)
    return OpenRuns(
        exp_id,
        parent_id,
        run.info.run_id,
        resumed=False,
        parent_params=parent_params,
        pipeline_run_id=spec.pipeline_run_id,
    )


def adopt_runs(client: MlflowClient, run_id: str, spec: RunSpec) -> OpenRuns:
    """The run someone else made for this component (`run_id`) and its parent, tagged as ours; nothing created.

    The parent is the run's `mlflow.parentRunId` (KFP's pipeline run), or the run itself when it has
    none. The pipeline run id is the spec's, else the one an earlier component tagged on the
    parent, else the parent's run id.
    """
    run = client.get_run(run_id)
    parent_id = run.data.tags.get(mlflow_api.MLFLOW_PARENT_RUN_ID) or run_id
    parent = run if parent_id == run_id else client.get_run(parent_id)
    pipeline_run_id = spec.pipeline_run_id or parent.data.tags.get(TAG_PIPELINE_RUN_ID) or parent_id
    own_tags = {
        **spec.tags,
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_COMPONENT: spec.component,
        TAG_CONFIG_SHA256: spec.config_sha256,
    }
    if parent_id != run_id:
        parent_tags = {**spec.tags, TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_COMPONENT: PIPELINE}
        client.log_batch(parent_id, tags=[mlflow_api.RunTag(k, v) for k, v in parent_tags.items()])
    client.log_batch(run_id, tags=[mlflow_api.RunTag(k, v) for k, v in own_tags.items()])
    return OpenRuns(
        run.info.experiment_id,
        parent_id,
        run_id,
        resumed=False,
        parent_params=dict(parent.data.params),
        owned=False,
        pipeline_run_id=pipeline_run_id,
    )


def close_runs(client: MlflowClient, runs: OpenRuns, status: str) -> None:
    """End the component run; the parent shows the state of the last component that ran.

    Runs someone else owns are left as they are: their owner ends them.
    """
    if not runs.owned:
        return
    client.set_terminated(runs.run_id, status)
    client.set_terminated(runs.parent_run_id, status)
