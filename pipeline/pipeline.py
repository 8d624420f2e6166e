"""The Kubeflow pipelines: data prep -> train -> predict -> evaluate (-> tracker stage, base model, compare,
export), its sweep, and data prep alone.

Their parameters are the parameter table's (`sam3_core/pipeline_parameters.py`): the pipeline
functions' signatures are generated from it (`pipeline.parameters.pipeline_function`), and each
component gets the parameters its own signature names (`pipeline.parameters.arguments`). Cluster
placement comes from `PipelineSettings`.

Decisions:
- Checks first: every pipeline run starts with `check_parameters`, which checks every parameter
  by the table before any other component runs (the CLI checks them before submitting, too; this
  catches a run started from the KFP UI). It also returns the GPUs the train pod requests (0 when
  it only launches a job).
- Caching: only the data prep plan is cached. Its output is content-addressed (same inputs -> same
  dataset id and bytes), so reusing it is correct as long as the store keeps the dataset (after
  wiping the store, submit with `--no-cache`). Train, predict and evaluate are never
  cached: they take the pipeline run id (their MLflow runs nest under the pipeline's parent
  run), so every pipeline run is a fresh, comparable experiment.
- Retries: every component is safe to retry. Data prep publishes atomically to a content-addressed
  folder; train resumes its run folder (named after the pipeline run) from last.pt, and a retried
  job launcher adopts its job; predict and evaluate overwrite their outputs atomically.
- Training mode is a run-time parameter handled inside the train component (pod: torchrun over the
  pod's GPUs; pytorchjob / trainjob: launch a multi-node job). This keeps the DAG free of
  dsl.If/dsl.OneOf, which kfp.local (`sam3pipe run --local`) cannot run.
- Sweeps (`build_sweep_pipeline`): one data prep, then a dsl.ParallelFor over the trials that
  `plan_sweep` expands from the spec, each trial plan_training -> train -> predict -> evaluate (the
  same components as the pipeline's, given the trial's item), then `select_best`. A trial's
  components record a failure instead of failing (pipeline/component_bodies.py), and `select_best`
  also runs after a trial's pod was killed (ignore_upstream_failure), reading the outcomes from the
  store; it fails only when no trial succeeded. The trials' items carry the dataset URI, and
  plan_training runs inside the loop, because kfp.local 2.17.3 hands a loop's iterations the loop
  item in place of any other upstream task output.
- The base model (`base_checkpoint`): its predict and evaluate are the fine-tuned model's components
  with `role="base"` (outputs under `<run>/base/`, MLflow runs `predict_base`, `evaluate_base`),
  then `compare` and `export` (SAM3's video checkpoint, registered as the video model). Without a
  base they run and do nothing, like a failed trial's components: no dsl.If, for kfp.local.
- The tracker stage (`tracker_steps` > 0) trains SAM3's tracker after the detector, on its best
  checkpoint (`train.stage=tracker`, MLflow run `train_tracker`, registered as `sam3-video-tracker`); the
  export then takes its checkpoint, detector and trained tracker. With 0 it does nothing, as above.
- Secrets: tasks get credentials from Kubernetes Secrets by name (kfp-kubernetes); no value is
  ever part of the compiled pipeline.
No postponed annotations in this module: KFP reads the pipeline functions' annotations as types.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_task import PipelineTask

from pipeline.jobs import LaunchSettings
from pipeline.kfp_components import Components, build_components
from pipeline.parameters import arguments, pipeline_function
from pipeline.settings import ComponentSettings, PipelineSettings
from sam3_core import pipeline_parameters as table


class DataPrepOutputs(NamedTuple):
    dataset_uri: str
    dataset_id: str


def _on_pod(task: PipelineTask, pod: ComponentSettings, cache: bool) -> PipelineTask:
    task.set_caching_options(cache)
    task.set_cpu_request(pod.cpu)
    task.set_memory_request(pod.memory).set_memory_limit(pod.memory)
    if pod.retries:
        task.set_retry(num_retries=pod.retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.set_timeout(task, pod.timeout_s)
    return task


def _with_object_store(task: PipelineTask, settings: PipelineSettings) -> PipelineTask:
    store = settings.object_store
    kubernetes.use_secret_as_env(
        task,
        secret_name=store.secret,
        secret_key_to_env={
            store.access_key_field: "AWS_ACCESS_KEY_ID",
            store.secret_key_field: "AWS_SECRET_ACCESS_KEY",
        },
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=store.config_map, config_map_key_to_env={key: key for key in store.config_map_keys}
    )
    task.set_env_variable("SAM3PIPE_IMAGE", settings.image)
    return task


def _with_tracking(task: PipelineTask, settings: PipelineSettings) -> PipelineTask:
    kubernetes.use_secret_as_env(
        task,
        secret_name=settings.mlflow.secret,
        secret_key_to_env={settings.mlflow.uri_field: "MLFLOW_TRACKING_URI"},
    )
    return task


def _on_gpu_nodes(task: PipelineTask, settings: PipelineSettings, gpus) -> PipelineTask:  # type: ignore[no-untyped-def]
    gpu = settings.gpu
    task.set_accelerator_type(gpu.accelerator_type).set_accelerator_limit(gpus)
    for key, value in gpu.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in gpu.tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key or None,
            operator=toleration.operator or None,
            value=toleration.value or None,
            effect=toleration.effect or None,
        )
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=gpu.shm_size
    )
    return task


def _tracked(task: PipelineTask, settings: PipelineSettings, pod: ComponentSettings) -> PipelineTask:
    """A component that writes to the store and MLflow; never cached."""
    return _with_tracking(_with_object_store(_on_pod(task, pod, cache=False), settings), settings)


def _sharded_data_prep(components: Components, settings: PipelineSettings) -> GraphComponent:
    """Data prep's fan-out: one pod per shard of the plan, then a merge that publishes the dataset.

    A nested pipeline because kfp.local iterates a ParallelFor only over a pipeline input; the
    shard and merge components are not KFP-cached but reuse the plan's published dataset themselves,
    so `submit --no-cache` (which reaches the top-level tasks only) still redoes everything.
    """

    @dsl.pipeline(name="data-prep", description="Stage the shards of a data prep plan in parallel, then merge them")
    def data_prep(plan_uri: str, shards: list) -> DataPrepOutputs:
        with dsl.ParallelFor(shards) as index:
            part = components.data_prep_shard(plan_uri=plan_uri, index=index).set_display_name("data prep shard")
            _with_object_store(_on_pod(part, settings.data_prep, cache=False), settings)
        merged = components.data_prep_merge(plan_uri=plan_uri, parts=dsl.Collected(part.outputs["part_uri"]))
        merged.set_display_name("data prep merge")
        _with_object_store(_on_pod(merged, settings.data_prep, cache=False), settings)
        return DataPrepOutputs(merged.outputs["dataset_uri"], merged.outputs["dataset_id"])

    return data_prep


def _data_prep_tasks(
    components: Components, settings: PipelineSettings, sharded_data_prep: GraphComponent, values: Mapping[str, Any]
) -> tuple[PipelineTask, PipelineTask]:
    """Plan (cached: same inputs, same plan), then the shards and the merge: (plan task, the task naming the dataset)."""
    planned = components.data_prep_plan(**arguments(components.data_prep_plan, values))
    _with_object_store(_on_pod(planned.set_display_name("data prep plan"), settings.data_prep, cache=True), settings)
    prep = sharded_data_prep(plan_uri=planned.outputs["plan_uri"], shards=planned.outputs["shards"])
    return planned, prep.set_display_name("data prep").set_caching_options(False)


def _checks(
    components: Components, settings: PipelineSettings, values: Mapping[str, Any], pipeline: str
) -> PipelineTask:
    """The first component: every parameter of `pipeline` checked (the others get their table defaults)."""
    every = {parameter.name: parameter.default for parameter in table.PARAMETERS}
    task = components.check_parameters(pipeline=pipeline, **arguments(components.check_parameters, {**every, **values}))
    return _on_pod(task.set_display_name("check parameters"), settings.check_parameters, cache=False)


def build_data_prep_pipeline(settings: PipelineSettings, defaults: Mapping[str, Any] | None = None) -> GraphComponent:
    """Data prep alone (plan -> shards -> merge), to prepare a large dataset on the cluster once for many runs.

    Its first component, the plan, checks the parameters itself: they are all its own.
    """
    components = build_components(settings)
    sharded_data_prep = _sharded_data_prep(components, settings)

    def body(values: dict[str, Any]) -> DataPrepOutputs:
        _, prep = _data_prep_tasks(components, settings, sharded_data_prep, values)
        return DataPrepOutputs(prep.outputs["dataset_uri"], prep.outputs["dataset_id"])

    summary = "Validate the source, stage its videos over `data_prep_shards` pods and publish one dataset."
    function = pipeline_function("prepare_data", table.DATA_PREP, body, DataPrepOutputs, summary, defaults or {})
    description = "Prepare a dataset with data prep spread over pods"
    return dsl.pipeline(name=f"{settings.name}-data-prep", description=description)(function)


def launch_settings(settings: PipelineSettings) -> dict[str, Any]:
    """The train component's launch settings of each job mode (a compile-time constant of the pipeline)."""
    return {
        mode: dataclasses.asdict(LaunchSettings.from_settings(settings, getattr(settings, mode)))
        for mode in ("pytorchjob", "trainjob")
    }


def _train_predict_evaluate(
    components: Components,
    settings: PipelineSettings,
    values: Mapping[str, Any],
    pod_gpus: Any,
    wiring: Mapping[str, Any],
    label: str = "",
) -> tuple[PipelineTask, PipelineTask, PipelineTask]:
    """One training and what follows it, each component given its parameters and `wiring` (dataset and
    run id, or a sweep's trial); `label` follows the component names on the KFP UI's graph."""
    trained = components.train(
        **arguments(components.train, values), **wiring, launch=launch_settings(settings)
    ).set_display_name(f"train{label}")
    _on_gpu_nodes(trained, settings, pod_gpus)
    _tracked(trained, settings, settings.train)

    checkpoint_uri, run_uri = trained.outputs["best_checkpoint_uri"], trained.outputs["run_uri"]
    predicted = components.predict(
        **arguments(components.predict, values), **wiring, checkpoint_uri=checkpoint_uri, run_uri=run_uri
    ).set_display_name(f"predict{label}")
    _on_gpu_nodes(predicted, settings, values["predict_gpus"])
    _tracked(predicted, settings, settings.predict)

    evaluated = components.evaluate(
        **arguments(components.evaluate, values),
        **wiring,
        predictions_uri=predicted.outputs["predictions_uri"],
        run_uri=run_uri,
        checkpoint_uri=checkpoint_uri,
    ).set_display_name(f"evaluate{label}")
    _tracked(evaluated, settings, settings.evaluate)
    return trained, predicted, evaluated


def _tracker_stage(
    components: Components,
    settings: PipelineSettings,
    values: Mapping[str, Any],
    pod_gpus: Any,
    wiring: Mapping[str, Any],
    trained: PipelineTask,
) -> PipelineTask:
    """With `tracker_steps`: SAM3's tracker trained on the fine-tuned detector's best checkpoint, in a pod
    shaped like the detector's training (its own job in the job modes); else a task that does nothing."""
    tracker = components.train_tracker(
        **arguments(components.train_tracker, values),
        **wiring,
        launch=launch_settings(settings),
        checkpoint_uri=trained.outputs["best_checkpoint_uri"],
    ).set_display_name("train tracker")
    _on_gpu_nodes(tracker, settings, pod_gpus)
    return _tracked(tracker, settings, settings.train)


def _base_model_tasks(
    components: Components,
    settings: PipelineSettings,
    values: Mapping[str, Any],
    wiring: Mapping[str, Any],
    trained: PipelineTask,
    evaluated: PipelineTask,
    tracker: PipelineTask,
) -> None:
    """With `base_checkpoint`: the base model predicted and evaluated like the fine-tuned one, the two
    compared, and the fine-tuned detector exported with the trained tracker (`tracker`'s, else the base's).
    Without it each of these tasks does nothing (kfp.local runs no dsl.If)."""
    run_uri, base = trained.outputs["run_uri"], values["base_checkpoint"]
    predicted = components.predict(
        **arguments(components.predict, values), **wiring, checkpoint_uri=base, run_uri=run_uri, role="base"
    ).set_display_name("predict base")
    _on_gpu_nodes(predicted, settings, values["predict_gpus"])
    _tracked(predicted, settings, settings.predict)

    evaluated_base = components.evaluate(
        **arguments(components.evaluate, values),
        **wiring,
        predictions_uri=predicted.outputs["predictions_uri"],
        run_uri=run_uri,
        checkpoint_uri=base,
        role="base",
    ).set_display_name("evaluate base")
    _tracked(evaluated_base, settings, settings.evaluate)

    compared = components.compare(
        **arguments(components.compare, values),
        **wiring,
        base_metrics_uri=evaluated_base.outputs["metrics_uri"],
        metrics_uri=evaluated.outputs["metrics_uri"],
        run_uri=run_uri,
    ).set_display_name("compare with base")
    _tracked(compared, settings, settings.compare)

    exported = components.export(
        **arguments(components.export, values),
        pipeline_run_id=wiring["pipeline_run_id"],
        checkpoint_uri=trained.outputs["best_checkpoint_uri"],
        tracker_checkpoint_uri=tracker.outputs["best_checkpoint_uri"],
        run_uri=run_uri,
    ).set_display_name("export video model")
    _tracked(exported, settings, settings.export)


def build_pipeline(settings: PipelineSettings, defaults: Mapping[str, Any] | None = None) -> GraphComponent:
    """The pipeline for these settings (image, secrets, placement are baked in at compile time).

    `defaults` (checked by the caller) replace the table's defaults of the compiled parameters.
    """
    components = build_components(settings)
    sharded_data_prep = _sharded_data_prep(components, settings)

    def body(values: dict[str, Any]) -> dict:
        checks = _checks(components, settings, values, table.RUN)
        planned, prep = _data_prep_tasks(components, settings, sharded_data_prep, values)
        planned.after(checks)
        wiring = {"dataset_uri": prep.outputs["dataset_uri"], "pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        trained, _, evaluated = _train_predict_evaluate(
            components, settings, values, checks.outputs["pod_gpus"], wiring
        )
        # the GPU count comes from the checks' output; the explicit edge also orders kfp.local's run
        trained.after(checks)
        tracker = _tracker_stage(components, settings, values, checks.outputs["pod_gpus"], wiring, trained)
        _base_model_tasks(components, settings, values, wiring, trained, evaluated, tracker)
        return evaluated.outputs["metric_values"]

    summary = "Fine-tune SAM3 on video clips and evaluate it; returns the evaluation metrics."
    function = pipeline_function("sam3_video_finetune", table.RUN, body, dict, summary, defaults or {})
    return dsl.pipeline(name=settings.name, description=settings.description)(function)


def build_sweep_pipeline(settings: PipelineSettings, defaults: Mapping[str, Any] | None = None) -> GraphComponent:
    """The sweep pipeline; a spec's `sweep_trials` / `sweep_grid` in `defaults` become its spec's defaults.

    The trials' parallelism is `settings.sweep.parallelism`: KFP's pipeline spec holds it as a
    number, so it is fixed when compiling (`--parallelism`), not chosen per run.
    """
    components = build_components(settings)
    sharded_data_prep = _sharded_data_prep(components, settings)

    def body(values: dict[str, Any]) -> dict:
        sweep_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        checks = _checks(components, settings, values, table.SWEEP)
        planned_data, prep = _data_prep_tasks(components, settings, sharded_data_prep, values)
        planned_data.after(checks)

        planned = components.plan_sweep(
            **arguments(components.plan_sweep, values),
            dataset_uri=prep.outputs["dataset_uri"],
            sweep_id=sweep_id,
            parallelism=settings.sweep.parallelism,
        ).set_display_name("plan sweep")
        _tracked(planned, settings, settings.plan_sweep)

        with dsl.ParallelFor(planned.output, parallelism=settings.sweep.parallelism) as trial:
            plan = components.plan_training(**arguments(components.plan_training, values))
            _on_pod(plan.set_display_name("plan training"), settings.plan_training, cache=False)
            trained, _, evaluated = _train_predict_evaluate(
                components, settings, values, plan.outputs["pod_gpus"], {"trial": trial}, " trial"
            )
            trained.after(plan)

        best = components.select_best(
            **arguments(components.select_best, values), trials=planned.output, sweep_id=sweep_id
        ).set_display_name("select best trial")
        best.after(evaluated).ignore_upstream_failure()
        _tracked(best, settings, settings.select_best)
        return best.outputs["Output"]

    summary = "Fine-tune SAM3 once per trial of a sweep on one prepared dataset; register the best trial."
    function = pipeline_function("sam3_video_sweep", table.SWEEP, body, dict, summary, defaults or {})
    description = f"Hyper-parameter sweep. {settings.description}"
    return dsl.pipeline(name=f"{settings.name}-sweep", description=description)(function)
