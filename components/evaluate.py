"""The evaluate component: score predictions and publish metrics.json, a per-category table and a PR plot.

Video GT gets the families of `metrics` (`map, phrase_ap, teta, hota, cgf1` of sam3's SA-Co/VEval
suite, `vos` for DAVIS J&F); by default `vos` when the predictions carry `gt_id`, sam3's five when
the GT has `video_np_pairs`, class mAP otherwise; plus sam3's per-(video, phrase) results as
`video_np_results.json` and the vos per-object table as `vos_per_object.csv`. Predictions may be
the predict component's or the files sam3's own video dumper writes. The MLflow run gets the same:
`eval/*` metrics, those files, the table as a grid and a short summary.

Before any work the output guard (sam3_core/outputs.py) refuses an `output` that would replace an
input or lie in a published dataset, and metrics of other settings unless `overwrite=true`; the
settings are recorded beside them in `evaluate_settings.json`.

`python -m components.evaluate --gt GT.json --predictions PRED.json --output out/metrics.json`
(or the same as Hydra overrides `gt=... predictions=... output=...`) prints
{"metrics_uri": ..., "metrics": {name: value}} as one JSON line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from components.runner import Usage, run_cli
from sam3_core.config import load_config, quote_value
from sam3_core.errors import ConfigError
from sam3_core.evaluate.report import (
    EvaluateConfig,
    category_rows,
    check_same_metrics,
    evaluation_settings,
    guard_output,
    output_folder,
    publish_report,
    report_files,
    run_evaluation,
)
from sam3_core.mlflow_records import component_run, eval_metrics

# Flag -> config key; flags are a convenience over the equivalent Hydra overrides.
FLAGS = {"--gt": "gt", "--predictions": "predictions", "--output": "output", "--frames-gt": "frames_gt"}


def flags_to_overrides(argv: list[str]) -> list[str]:
    """`--gt X` style flags become `gt='X'` overrides; everything else passes through as overrides."""
    parser = argparse.ArgumentParser(prog="evaluate", add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in FLAGS:
        parser.add_argument(flag)
    try:
        known, rest = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise ConfigError(f"evaluate: {exc}; write {exc.argument_name} <uri>") from exc
    values = {key: getattr(known, key) for key in FLAGS.values()}
    flagged = [f"{key}={quote_value(value)}" for key, value in values.items() if value is not None]
    return rest + flagged


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config, evaluate, publish, track; return the metrics URI and the metrics."""
    overrides = flags_to_overrides(overrides)
    cfg = load_config("evaluate", EvaluateConfig, overrides)
    guard_output(cfg)
    with component_run(
        cfg.mlflow, "evaluate", cfg, overrides=overrides, dataset_uri=cfg.gt, output_uri=output_folder(cfg.output)
    ) as run:
        report = run_evaluation(cfg)
        check_same_metrics(report, cfg)
        metrics_uri = publish_report(report, cfg.output, evaluation_settings(cfg))
        run.log_eval(report.metrics)
        for uri in report_files(report, cfg.output):
            run.log_file(uri)
        header, rows = category_rows(report)
        run.log_table([dict(zip(header, row)) for row in rows], "per_category.json")
        run.log_summary(
            f"Evaluation of {cfg.predictions}",
            {name: f"{value:.4f}" for name, value in sorted(eval_metrics(report.metrics).items())},
        )
        run.set_outputs({"metrics_uri": metrics_uri})
    return {"metrics_uri": metrics_uri, "metrics": report.metrics}


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "evaluate", EvaluateConfig))


if __name__ == "__main__":
    sys.exit(main())
