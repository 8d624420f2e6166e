"""Compile the pipeline to the YAML package Kubeflow Pipelines uploads and runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfp import compiler
from kfp.dsl.graph_component import GraphComponent

from pipeline.pipeline import build_pipeline, build_sweep_pipeline
from pipeline.settings import PipelineSettings

logger = logging.getLogger(__name__)


def pipeline_for(
    settings: PipelineSettings, sweep: dict[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
) -> GraphComponent:
    """The pipeline, or with a sweep spec (sweep.load_spec) the sweep pipeline with that spec as its default.

    `defaults` (checked parameter values, `arguments.parse_arguments`) replace the table's defaults.
    """
    if sweep is None:
        return build_pipeline(settings, defaults)
    return build_sweep_pipeline(settings, {**sweep, **(defaults or {})})


def compile_pipeline(
    settings: PipelineSettings,
    output: Path,
    sweep: dict[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    pipeline = pipeline_for(settings, sweep, defaults)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output))
    logger.info("compiled pipeline %r (image %s) to %s", pipeline.name, settings.image, output)
    return output
