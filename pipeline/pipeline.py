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
  PyTorchJob launcher adopts its job; predict and evaluate overwrite their outputs atomically.
- Training mode is a run-time parameter handled inside the train step (pod: torchrun over the
  pod's GPUs; pytorchjob: launch a multi-node job). `plan_training` checks the knobs first and
  returns the GPUs the train pod itself requests (0 when it only launches a job). This keeps the
  DAG free of dsl.If/dsl.OneOf, which kfp.local (`sam3pipe run --local`) cannot run.
- Secrets: tasks get credentials from Kubernetes Secrets by name (kfp-kubernetes); no value is
  ever part of the compiled pipeline.
No postponed annotations in this module: KFP reads the pipeline function's annotations as types.
"""

import dataclasses

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_task import PipelineTask

from pipeline.kfp_components import build_components
from pipeline.pytorchjob import LaunchSettings
from pipeline.settings import PipelineSettings, StepSettings


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
        secret_key_to_env={store.access_key_field: "AWS_ACCESS_KEY_ID", store.secret_key_field: "AWS_SECRET_ACCESS_KEY"},
    )
    kubernetes.use_config_map_as_env(
        task, config_map_name=store.config_map, config_map_key_to_env={key: key for key in store.config_map_keys}
    )
    task.set_env_variable("SAM3PIPE_IMAGE", settings.image)
    return task


def _with_tracking(task: PipelineTask, settings: PipelineSettings) -> PipelineTask:
    kubernetes.use_secret_as_env(
        task,
        secret_name=settings.tracking.secret,
        secret_key_to_env={settings.tracking.uri_field: "MLFLOW_TRACKING_URI"},
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
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=gpu.shm_size)
    return task


def build_pipeline(settings: PipelineSettings) -> GraphComponent:
    """The pipeline for these settings (image, secrets, placement are baked in at compile time)."""
    ops = build_components(settings)
    launch = dataclasses.asdict(LaunchSettings.from_settings(settings))

    @dsl.pipeline(name=settings.name, description=settings.description)
    def sam3_video_finetune(
        source: str = "synthetic",
        annotations: str = "",
        frames_root: str = "",
        model_preset: str = "tiny",
        checkpoint: str = "",
        max_steps: int = 400,
        lr: float = 1e-3,
        batch_size: int = 2,
        frames_per_clip: int = 2,
        freeze_prefixes: list = [],  # noqa: B006 (KFP reads defaults from the signature)
        store: str = "",
        mlflow_experiment: str = "sam3pipe",
        training_mode: str = "pod",
        gpus: int = 0,
        nodes: int = 1,
        predict_gpus: int = 0,
        data_prep_overrides: list = [],  # noqa: B006
        train_overrides: list = [],  # noqa: B006
        predict_overrides: list = [],  # noqa: B006
        evaluate_overrides: list = [],  # noqa: B006
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
            training_mode: "pod" (torchrun over one pod's GPUs) or "pytorchjob" (multi-node PyTorchJob).
            gpus: GPUs of the training pod, or per node with training_mode=pytorchjob.
            nodes: Pods of the PyTorchJob (training_mode=pytorchjob).
            predict_gpus: GPUs of the prediction pod.
            data_prep_overrides: Extra Hydra overrides of data prep, e.g. ["synthetic.num_videos=8"].
            train_overrides: Extra Hydra overrides of training.
            predict_overrides: Extra Hydra overrides of prediction.
            evaluate_overrides: Extra Hydra overrides of evaluation.
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        prep = ops.data_prep(
            source=source, annotations=annotations, frames_root=frames_root, store=store, overrides=data_prep_overrides
        ).set_display_name("data prep")
        _with_object_store(_on_step(prep, settings.data_prep, cache=True), settings)

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
