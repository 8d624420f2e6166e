"""Pipeline step: base against fine-tuned, the difference, and SAM3's published row where the data is its benchmark.

`python -m components.compare base=<metrics.json> fine_tuned=<metrics.json> output=<folder>
[dataset=<dataset_uri>] [reference=auto|none|<name>]` writes comparison.json, .md and .csv under
`output` and prints {"comparison_uri"} as one JSON line. The MLflow run logs every compared metric
as `compare/base/<m>`, `compare/fine_tuned/<m>`, `compare/delta/<m>` (and `compare/published/<m>`);
SAM3's headline ones reach the pipeline's parent row (`mlflow.headline_metrics`).
"""

from __future__ import annotations

import sys
from typing import Any

from components.runner import Usage, run_cli
from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.data.prep import MANIFEST
from sam3_core.evaluate.comparison import (
    CompareConfig,
    comparison_metrics,
    comparison_rows,
    publish_comparison,
    read_metrics,
    reference_for,
)
from sam3_core.mlflow_records import component_run


def execute(overrides: list[str]) -> dict[str, Any]:
    """Read both metrics files and the dataset's source, write the table, track it; every input is read first."""
    cfg = load_config("compare", CompareConfig, overrides)
    base, fine_tuned = read_metrics(cfg.base), read_metrics(cfg.fine_tuned)
    source = storage.read_json(storage.join(cfg.dataset, MANIFEST)).get("source") if cfg.dataset else None
    reference = reference_for(cfg.reference, source)
    header, rows = comparison_rows(base, fine_tuned, reference)
    with component_run(
        cfg.mlflow, "compare", cfg, overrides=overrides, dataset_uri=cfg.dataset, output_uri=cfg.output
    ) as run:
        comparison_uri = publish_comparison(header, rows, cfg.output)
        values = comparison_metrics(base, fine_tuned, reference)
        run.log_metrics({f"compare/{name}": value for name, value in values.items()}, step=0)
        run.log_file(comparison_uri)
        run.log_table([dict(zip(header, row)) for row in rows], "comparison_table.json")
        run.set_outputs({"comparison_uri": comparison_uri})
    return {"comparison_uri": comparison_uri}


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "compare", CompareConfig))


if __name__ == "__main__":
    sys.exit(main())
