"""Compile the pipeline to the YAML package Kubeflow Pipelines uploads and runs."""

from __future__ import annotations

import logging
from pathlib import Path

from kfp import compiler

from pipeline.pipeline import build_pipeline
from pipeline.settings import PipelineSettings

logger = logging.getLogger(__name__)


def compile_pipeline(settings: PipelineSettings, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(settings), str(output))
    logger.info("compiled pipeline %r (image %s) to %s", settings.name, settings.image, output)
    return output
