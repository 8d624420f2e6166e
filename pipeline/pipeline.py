"""The Kubeflow pipeline: data prep -> (plan) -> train -> predict -> evaluate.

Pipeline parameters are the per-run knobs; their defaults are the `make demo` run (synthetic
videos, tiny model, a few CPU steps). Cluster placement comes from `PipelineSettings`.

Decisions:
- Caching: only data prep is cached. Its output is content-addressed (same inputs -> same
  dataset id and bytes), so reusing it is correct as long as the store keeps the dataset (after
  wiping the store, submit with `--no-cache`). Train, predict and evaluate are never
  cached: they take the pipeline run id (their MLflow runs nest under the pipeline's parent
  run), so every pipeline run is a fresh, comparable experiment.
- Retries: every step is safe to retry. Data prep publishes atomically to a content-addressed
  folder; train resumes its run folder (named after the pipeline run) from last.pt, and a retried
  job launcher adopts its job; predict and evaluate overwrite their outputs atomically.
- Training mode is a run-time parameter handled inside the train step (pod: torchrun over the
  pod's GPUs; pytorchjob / trainjob: launch a multi-node job). `plan_training` checks the knobs first and
  returns the GPUs the train pod itself requests (0 when it only launches a job). This keeps the
  DAG free of dsl.If/dsl.OneOf, which kfp.local (`sam3pipe run --local`) cannot run.
- Sweeps (`build_sweep_pipeline`): one data prep, then a dsl.ParallelFor over the trials that
  `plan_sweep` expands from the spec, each trial plan -> train -> predict -> evaluate, then
  `select_best`. A trial's steps record a failure instead of failing (pipeline/sweep.py), and
  `select_best` also runs after a trial's pod was killed (ignore_upstream_failure), reading the
  outcomes from the store; it fails only when no trial succeeded. The trials' items carry the
  dataset URI, and plan_training runs inside the loop, because kfp.local 2.17.3 hands a loop's
  iterations the loop item in place of any other upstream task output.
- Secrets: tasks get credentials from Kubernetes Secrets by name (kfp-kubernetes); no value is
  ever part of the compiled pipeline.
No postponed annotations in this module: KFP reads the pipeline function's annotations as types.
"""

import dataclasses
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_task import PipelineTask

from pipeline import steps, sweep
from pipeline.jobs import LaunchSettings
from pipeline.kfp_components import Components, build_components
from pipeline.settings import PipelineSettings, StepSettings


class DataPrepOutputs(NamedTuple):
    dataset_uri: str
    dataset_id: str


def _on_step(task: PipelineTask, step: StepSettings, cache: bool) -> PipelineTask:
    task.set_caching_options(cache)
    task.set_cpu_request(step.cpu)
    task.set_memory_request(step.memory).set_memory_limit(step.memory)
    if step.retries:
        task.set_retry(num_retries=step.retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.set_timeout(task, step.timeout_s)
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


def _sharded_data_prep(ops: Components, settings: PipelineSettings) -> GraphComponent:
    """Data prep's fan-out: one pod per shard of the plan, then a merge that publishes the dataset.

    A nested pipeline because kfp.local iterates a ParallelFor only over a pipeline input; the
    shard and merge steps are not KFP-cached but reuse the plan's published dataset themselves,
    so `submit --no-cache` (which reaches the top-level steps only) still redoes everything.
    """

    @dsl.pipeline(name="data-prep", description="Stage the shards of a data prep plan in parallel, then merge them")
    def data_prep(plan_uri: str, shards: list) -> DataPrepOutputs:
        with dsl.ParallelFor(shards) as index:
            part = ops.data_prep_shard(plan_uri=plan_uri, index=index).set_display_name("data prep shard")
            _with_object_store(_on_step(part, settings.data_prep, cache=False), settings)
        merged = ops.data_prep_merge(plan_uri=plan_uri, parts=dsl.Collected(part.outputs["part_uri"]))
        merged.set_display_name("data prep merge")
        _with_object_store(_on_step(merged, settings.data_prep, cache=False), settings)
        return DataPrepOutputs(merged.outputs["dataset_uri"], merged.outputs["dataset_id"])

    return data_prep


def _data_prep_tasks(  # type: ignore[no-untyped-def]
    ops: Components,
    settings: PipelineSettings,
    sharded_data_prep: GraphComponent,
    source,
    annotations,
    frames_root,
    store,
    overrides,
    shards,
) -> PipelineTask:
    """Plan (cached: same inputs, same plan), then the shards and the merge; the task whose outputs name the dataset."""
    planned = ops.data_prep_plan(
        source=source,
        annotations=annotations,
        frames_root=frames_root,
        store=store,
        overrides=overrides,
        shards=shards,
    ).set_display_name("data prep plan")
    _with_object_store(_on_step(planned, settings.data_prep, cache=True), settings)
    prep = sharded_data_prep(plan_uri=planned.outputs["plan_uri"], shards=planned.outputs["shards"])
    return prep.set_display_name("data prep").set_caching_options(False)


def build_data_prep_pipeline(settings: PipelineSettings) -> GraphComponent:
    """Data prep alone (plan -> shards -> merge), to prepare a large dataset on the cluster once for many runs."""
    ops = build_components(settings)
    sharded_data_prep = _sharded_data_prep(ops, settings)

    @dsl.pipeline(name=f"{settings.name}-data-prep", description="Prepare a dataset with data prep spread over pods")
    def prepare_data(  # type: ignore[no-untyped-def]
        source: str = "synthetic",
        annotations: str = "",
        frames_root: str = "",
        store: str = "",
        data_prep_shards: int = 1,
        data_prep_overrides: list = [],
    ) -> DataPrepOutputs:
        """Validate the source, stage its videos over `data_prep_shards` pods and publish one dataset.

        Args:
            source: "synthetic", "ytvis" (YouTube-VIS / OVIS), "saco" (SA-Co/VEval) or "mp4" (video files).
            annotations: URI of the annotation JSON (file sources).
            frames_root: URI the annotation's frame or video file names are relative to (file sources).
            store: Object-store root for datasets; "" = SAM3PIPE_STORE of the pods.
            data_prep_shards: Data-prep pods the videos are spread over; any width gives the same dataset.
            data_prep_overrides: Extra Hydra overrides of data prep, e.g. ["resize_max_side=1008"].
        """
        prep = _data_prep_tasks(
            ops,
            settings,
            sharded_data_prep,
            source,
            annotations,
            frames_root,
            store,
            data_prep_overrides,
            data_prep_shards,
        )
        return DataPrepOutputs(prep.outputs["dataset_uri"], prep.outputs["dataset_id"])

    return prepare_data


def launch_settings(settings: PipelineSettings) -> dict[str, Any]:
    """The train step's launch settings of each job mode (a compile-time constant of the pipeline)."""
    return {
        mode: dataclasses.asdict(LaunchSettings.from_settings(settings, getattr(settings, mode)))
        for mode in ("pytorchjob", "trainjob")
    }


def build_pipeline(settings: PipelineSettings) -> GraphComponent:
    """The pipeline for these settings (image, secrets, placement are baked in at compile time)."""
    ops = build_components(settings)
    launch = launch_settings(settings)
    sharded_data_prep = _sharded_data_prep(ops, settings)

    @dsl.pipeline(name=settings.name, description=settings.description)
    def sam3_video_finetune(
        source: str = "synthetic",
        annotations: str = "",
        frames_root: str = "",
        model_preset: str = "tiny",
        checkpoint: str = "",
        max_steps: int = steps.DEFAULT_MAX_STEPS,
        lr: float = steps.DEFAULT_LR,
        batch_size: int = 2,
        frames_per_clip: int = 2,
        freeze_prefixes: list = [],
        store: str = "",
        mlflow_experiment: str = "sam3pipe",
        training_mode: str = "pod",
        gpus: int = 0,
        nodes: int = 1,
        predict_gpus: int = 0,
        data_prep_shards: int = 1,
        data_prep_overrides: list = [],
        train_overrides: list = [],
        predict_overrides: list = [],
        evaluate_overrides: list = [],
    ) -> dict:
        """Fine-tune SAM3 on video clips and evaluate it; returns the evaluation metrics.

        Args:
            source: "synthetic" (generated videos) or "ytvis" (annotations + frames_root).
            annotations: URI of the YouTube-VIS / SA-Co VEval annotation JSON (source=ytvis).
            frames_root: URI the annotation's file_names are relative to (source=ytvis).
            model_preset: "tiny" (CPU-sized) or "full" (the official SAM3 architecture).
            checkpoint: URI of weights to start from (ours or the official SAM3 checkpoint); "" = random init.
            max_steps: Optimiser steps.
            lr: Peak learning rate.
            batch_size: Clips per process per step.
            frames_per_clip: Frames of each training clip.
            freeze_prefixes: Parameter-name prefixes to freeze, e.g. ["backbone.vision_backbone"].
            store: Object-store root for datasets and runs; "" = SAM3PIPE_STORE of the pods.
            mlflow_experiment: MLflow experiment of the runs.
            training_mode: "pod" (torchrun over one pod's GPUs), "pytorchjob" (multi-node PyTorchJob, Training
                Operator) or "trainjob" (multi-node TrainJob, Kubeflow Trainer v2).
            gpus: GPUs of the training pod, or per node with training_mode=pytorchjob or trainjob.
            nodes: Nodes (pods) of the PyTorchJob or TrainJob.
            predict_gpus: GPUs of the prediction pod.
            data_prep_shards: Data-prep pods the videos are spread over (the fan-out width); any width, same dataset.
            data_prep_overrides: Extra Hydra overrides of data prep, e.g. ["synthetic.num_videos=8"].
            train_overrides: Extra Hydra overrides of training.
            predict_overrides: Extra Hydra overrides of prediction.
            evaluate_overrides: Extra Hydra overrides of evaluation.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        prep = _data_prep_tasks(
            ops,
            settings,
            sharded_data_prep,
            source,
            annotations,
            frames_root,
            store,
            data_prep_overrides,
            data_prep_shards,
        )

        plan = ops.plan_training(training_mode=training_mode, gpus=gpus, nodes=nodes).set_display_name("plan training")
        _on_step(plan, settings.plan_training, cache=False)

        trained = ops.train(
            dataset_uri=prep.outputs["dataset_uri"],
            model_preset=model_preset,
            checkpoint=checkpoint,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            frames_per_clip=frames_per_clip,
            freeze_prefixes=freeze_prefixes,
            store=store,
            training_mode=training_mode,
            gpus=gpus,
            nodes=nodes,
            pipeline_run_id=run_id,
            mlflow_experiment=mlflow_experiment,
            overrides=train_overrides,
            launch=launch,
        ).set_display_name("train")
        # the GPU count comes from plan's output; the explicit edge also orders kfp.local's run
        trained.after(plan)
        _on_gpu_nodes(trained, settings, plan.outputs["pod_gpus"])
        _with_tracking(_with_object_store(_on_step(trained, settings.train, cache=False), settings), settings)

        predicted = ops.predict(
            dataset_uri=prep.outputs["dataset_uri"],
            model_preset=model_preset,
            checkpoint_uri=trained.outputs["best_checkpoint_uri"],
            run_uri=trained.outputs["run_uri"],
            gpus=predict_gpus,
            pipeline_run_id=run_id,
            mlflow_experiment=mlflow_experiment,
            overrides=predict_overrides,
        ).set_display_name("predict")
        _on_gpu_nodes(predicted, settings, predict_gpus)
        _with_tracking(_with_object_store(_on_step(predicted, settings.predict, cache=False), settings), settings)

        evaluated = ops.evaluate(
            dataset_uri=prep.outputs["dataset_uri"],
            predictions_uri=predicted.outputs["predictions_uri"],
            run_uri=trained.outputs["run_uri"],
            pipeline_run_id=run_id,
            mlflow_experiment=mlflow_experiment,
            overrides=evaluate_overrides,
        ).set_display_name("evaluate")
        _with_tracking(_with_object_store(_on_step(evaluated, settings.evaluate, cache=False), settings), settings)
        return evaluated.outputs["metric_values"]

    return sam3_video_finetune


# The sweep's default spec: the demo's learning rate and half of it.
DEFAULT_SWEEP_GRID = {"lr": [steps.DEFAULT_LR / 2, steps.DEFAULT_LR]}


def build_sweep_pipeline(
    settings: PipelineSettings,
    sweep_trials: list[dict[str, Any]] | None = None,
    sweep_grid: dict[str, Any] | None = None,
) -> GraphComponent:
    """The sweep pipeline; `sweep_trials` / `sweep_grid` become the defaults of its spec parameters.

    The trials' parallelism is `settings.sweep.parallelism`: KFP's pipeline spec holds it as a
    number, so it is fixed when compiling (`--parallelism`), not chosen per run.
    """
    ops = build_components(settings)
    launch = launch_settings(settings)
    sharded_data_prep = _sharded_data_prep(ops, settings)
    default_trials = list(sweep_trials or [])
    default_grid = dict(DEFAULT_SWEEP_GRID if sweep_grid is None and not default_trials else sweep_grid or {})

    @dsl.pipeline(name=f"{settings.name}-sweep", description=f"Hyper-parameter sweep. {settings.description}")
    def sam3_video_sweep(
        sweep_trials: list = default_trials,
        sweep_grid: dict = default_grid,
        sweep_metric: str = sweep.DEFAULT_METRIC,
        sweep_mode: str = "max",
        registered_model: str = "sam3-video",
        source: str = "synthetic",
        annotations: str = "",
        frames_root: str = "",
        model_preset: str = "tiny",
        checkpoint: str = "",
        max_steps: int = steps.DEFAULT_MAX_STEPS,
        lr: float = steps.DEFAULT_LR,
        batch_size: int = 2,
        frames_per_clip: int = 2,
        freeze_prefixes: list = [],
        store: str = "",
        mlflow_experiment: str = "sam3pipe",
        training_mode: str = "pod",
        gpus: int = 0,
        nodes: int = 1,
        predict_gpus: int = 0,
        data_prep_shards: int = 1,
        data_prep_overrides: list = [],
        train_overrides: list = [],
        predict_overrides: list = [],
        evaluate_overrides: list = [],
    ) -> dict:
        """Fine-tune SAM3 once per trial of a sweep on one prepared dataset; register the best trial.

        Args:
            sweep_trials: Override sets, one trial each, e.g. [{"lr": 1e-4}, {"lr": 3e-4, "frames_per_clip": 4}].
            sweep_grid: Values per setting, one trial per combination, e.g. {"lr": [1e-4, 3e-4]}.
            sweep_metric: Evaluation metric the best trial is picked by, e.g. video_mask_mAP_50_95 or segm_AP.
            sweep_mode: "max" or "min" of sweep_metric.
            registered_model: Model Registry name; the best trial's checkpoint gets the alias "candidate".
            source: "synthetic" (generated videos) or "ytvis" (annotations + frames_root).
            annotations: URI of the YouTube-VIS / SA-Co VEval annotation JSON (source=ytvis).
            frames_root: URI the annotation's file_names are relative to (source=ytvis).
            model_preset: "tiny" (CPU-sized) or "full" (the official SAM3 architecture); a trial may set it.
            checkpoint: URI of weights to start from; "" = random init; a trial may set it.
            max_steps: Optimiser steps (a trial may set it).
            lr: Peak learning rate (a trial may set it).
            batch_size: Clips per process per step (a trial may set it).
            frames_per_clip: Frames of each training clip (a trial may set it).
            freeze_prefixes: Parameter-name prefixes to freeze (a trial may set it).
            store: Object-store root for datasets and runs; "" = SAM3PIPE_STORE of the pods.
            mlflow_experiment: MLflow experiment of the sweep's runs.
            training_mode: "pod", "pytorchjob" or "trainjob" (see the pipeline without sweep).
            gpus: GPUs of each trial's training pod, or per node in a job.
            nodes: Nodes of each trial's PyTorchJob or TrainJob.
            predict_gpus: GPUs of each trial's prediction pod.
            data_prep_shards: Data-prep pods the videos are spread over (the fan-out width); any width, same dataset.
            data_prep_overrides: Extra Hydra overrides of data prep.
            train_overrides: Extra Hydra overrides of every trial's training.
            predict_overrides: Extra Hydra overrides of every trial's prediction.
            evaluate_overrides: Extra Hydra overrides of every trial's evaluation.
        """
        sweep_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        prep = _data_prep_tasks(
            ops,
            settings,
            sharded_data_prep,
            source,
            annotations,
            frames_root,
            store,
            data_prep_overrides,
            data_prep_shards,
        )

        planned = ops.plan_sweep(
            sweep_trials=sweep_trials,
            sweep_grid=sweep_grid,
            dataset_uri=prep.outputs["dataset_uri"],
            sweep_id=sweep_id,
            sweep_metric=sweep_metric,
            sweep_mode=sweep_mode,
            parallelism=settings.sweep.parallelism,
            training_mode=training_mode,
            gpus=gpus,
            nodes=nodes,
            store=store,
            mlflow_experiment=mlflow_experiment,
        ).set_display_name("plan sweep")
        _with_tracking(_with_object_store(_on_step(planned, settings.plan_sweep, cache=False), settings), settings)

        with dsl.ParallelFor(planned.output, parallelism=settings.sweep.parallelism) as trial:
            plan = ops.plan_training(training_mode=training_mode, gpus=gpus, nodes=nodes).set_display_name(
                "plan training"
            )
            _on_step(plan, settings.plan_training, cache=False)
            trained = ops.train_trial(
                trial=trial,
                model_preset=model_preset,
                checkpoint=checkpoint,
                max_steps=max_steps,
                lr=lr,
                batch_size=batch_size,
                frames_per_clip=frames_per_clip,
                freeze_prefixes=freeze_prefixes,
                store=store,
                training_mode=training_mode,
                gpus=gpus,
                nodes=nodes,
                mlflow_experiment=mlflow_experiment,
                registered_model=registered_model,
                overrides=train_overrides,
                launch=launch,
            ).set_display_name("train trial")
            trained.after(plan)
            _on_gpu_nodes(trained, settings, plan.outputs["pod_gpus"])
            _with_tracking(_with_object_store(_on_step(trained, settings.train, cache=False), settings), settings)

            predicted = ops.predict_trial(
                trial=trial,
                model_preset=model_preset,
                checkpoint_uri=trained.outputs["best_checkpoint_uri"],
                run_uri=trained.outputs["run_uri"],
                gpus=predict_gpus,
                store=store,
                mlflow_experiment=mlflow_experiment,
                registered_model=registered_model,
                overrides=predict_overrides,
            ).set_display_name("predict trial")
            _on_gpu_nodes(predicted, settings, predict_gpus)
            _with_tracking(_with_object_store(_on_step(predicted, settings.predict, cache=False), settings), settings)

            evaluated = ops.evaluate_trial(
                trial=trial,
                predictions_uri=predicted.outputs["predictions_uri"],
                run_uri=trained.outputs["run_uri"],
                checkpoint_uri=trained.outputs["best_checkpoint_uri"],
                store=store,
                mlflow_experiment=mlflow_experiment,
                registered_model=registered_model,
                overrides=evaluate_overrides,
            ).set_display_name("evaluate trial")
            _with_tracking(_with_object_store(_on_step(evaluated, settings.evaluate, cache=False), settings), settings)

        best = ops.select_best(
            trials=planned.output,
            sweep_id=sweep_id,
            sweep_metric=sweep_metric,
            sweep_mode=sweep_mode,
            store=store,
            mlflow_experiment=mlflow_experiment,
            registered_model=registered_model,
        ).set_display_name("select best trial")
        best.after(evaluated).ignore_upstream_failure()
        _with_tracking(_with_object_store(_on_step(best, settings.select_best, cache=False), settings), settings)
        return best.outputs["Output"]

    return sam3_video_sweep
