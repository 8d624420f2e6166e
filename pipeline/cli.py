"""`sam3pipe`: run one component, compile or submit the Kubeflow pipeline, run it locally, open MLflow.

    sam3pipe component <data-prep|train|predict|evaluate> [hydra overrides]
    sam3pipe compile --output pipeline.yaml [--set image=...] [--sweep SPEC [--parallelism N]] [name=value ...]
    sam3pipe submit --host URL [--experiment NAME] [--namespace NS] [--sweep SPEC [--parallelism N]] [name=value ...]
    sam3pipe run --local [--runner docker --set image=...] [name=value ...]
    sam3pipe sweep --local --spec SPEC [--parallelism N] [name=value ...]
    sam3pipe render-job <trainjob|pytorchjob> [--set key=value ...] [name=value ...]
    sam3pipe compile-experiment --spec GRID --dataset-uri URI [--name NAME] [--output FILE] [name=value ...]
    sam3pipe ui
    sam3pipe reproduce <MLflow run id | pipeline run id> [--allow-other-commit] [--dry-run] [--host URL [--wait]]

Pipeline parameters are `name=value` pairs (lists as JSON; the table and its help:
sam3_core/pipeline_parameters.py), checked before anything is compiled, submitted or run;
`profile=demo` starts from the demo's values, and `compile` makes them the package's defaults.
Compile-time settings (image, secret names, GPU placement, timeouts) are `--set key=value` (see
pipeline/settings.py).
A sweep SPEC is JSON or a JSON/YAML file: a grid {"lr": [1e-4, 3e-4]} or a list of override
sets [{"lr": 1e-4}, ...] (see pipeline/sweep.py).
Errors the user can fix print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from components.runner import EXIT_INTERRUPTED, EXIT_USER_ERROR, TRACEBACK_ENV, user_error_message
from pipeline.dispatch import COMPONENT_MODULES, component_module
from sam3_core.console import configure_console
from sam3_core.errors import ConfigError, InputError

if TYPE_CHECKING:
    from pipeline.settings import PipelineSettings

logger = logging.getLogger("sam3pipe")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam3pipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    component = commands.add_parser("component", help="run one pipeline component here, as its pod would")
    component.add_argument("component", choices=sorted(COMPONENT_MODULES))
    component.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides / flags of the component")

    def with_settings(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="a compile-time setting"
        )

    compile_ = commands.add_parser("compile", help="compile the pipeline to a KFP YAML package")
    compile_.add_argument("--output", type=Path, default=Path("pipeline.yaml"))
    compile_.add_argument("parameters", nargs="*", metavar="name=value", help="the compiled package's defaults")
    with_settings(compile_)
    _with_sweep_spec(compile_)

    submit = commands.add_parser("submit", help="start a run on a Kubeflow Pipelines server")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", default=None, help="KFP experiment name")
    submit.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")
    submit.add_argument("--run-name", default=None)
    submit.add_argument("--service-account", default=None, help="service account the run's pods use")
    submit.add_argument("--existing-token", default=None, help="bearer token (default: env KFP_EXISTING_TOKEN)")
    submit.add_argument("--no-cache", action="store_true", help="rerun every component, even a cached data prep")
    submit.add_argument("parameters", nargs="*", metavar="name=value")
    with_settings(submit)
    _with_sweep_spec(submit)

    run = commands.add_parser("run", help="run the whole pipeline on this machine")
    run.add_argument("--local", action="store_true", required=True, help="with kfp.local, in this environment")
    run.add_argument(
        "--pipeline-root",
        type=Path,
        default=None,
        help="where kfp.local keeps component outputs (default: <SAM3PIPE_HOME, else .sam3pipe>/kfp-local)",
    )
    run.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: components in this environment; docker: every component in the image (--set image=...)",
    )
    run.add_argument("parameters", nargs="*", metavar="name=value")
    with_settings(run)

    _add_sweep_command(commands, with_settings)
    _add_experiment_command(commands, with_settings)

    render = commands.add_parser(
        "render-job", help="print the training job the train component would create (TrainJob or PyTorchJob) as YAML"
    )
    render.add_argument("kind", choices=("trainjob", "pytorchjob"))
    render.add_argument(
        "parameters", nargs="*", metavar="name=value", help="pipeline parameters, dataset_uri=, pipeline_run_id="
    )
    with_settings(render)

    ui = commands.add_parser("ui", help="open the MLflow UI on the local tracking store")
    ui.add_argument("--port", type=int, default=5000)
    _add_reproduce(commands)
    return parser


def _with_sweep_spec(sub: argparse.ArgumentParser) -> None:
    """compile / submit: `--sweep SPEC` selects the sweep pipeline, with SPEC as its trials."""
    sub.add_argument("--sweep", default=None, metavar="SPEC", help="a sweep: JSON grid or override sets, or a file")
    _with_parallelism(sub)


def _with_parallelism(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--parallelism",
        type=int,
        default=None,
        metavar="N",
        help="trials at once (0 = all); fixed in the compiled pipeline (setting sweep.parallelism)",
    )


def _add_sweep_command(commands: argparse._SubParsersAction, with_settings: Any) -> None:
    sweep = commands.add_parser("sweep", help="run a hyper-parameter sweep on this machine")
    sweep.add_argument("--local", action="store_true", required=True, help="with kfp.local, in this environment")
    sweep.add_argument(
        "--spec",
        required=True,
        metavar="SPEC",
        help='the trials: a grid {"lr": [1e-4, 3e-4]}, override sets, or a file',
    )
    sweep.add_argument(
        "--pipeline-root",
        type=Path,
        default=None,
        help="where kfp.local keeps component outputs (default: <SAM3PIPE_HOME, else .sam3pipe>/kfp-local)",
    )
    sweep.add_argument("parameters", nargs="*", metavar="name=value")
    with_settings(sweep)
    _with_parallelism(sweep)


def _add_experiment_command(commands: argparse._SubParsersAction, with_settings: Any) -> None:
    experiment = commands.add_parser("compile-experiment", help="write the sweep as a Katib Experiment manifest")
    experiment.add_argument(
        "--spec", required=True, metavar="GRID", help='the grid, e.g. {"lr": [1e-4, 3e-4]}, or a file'
    )
    experiment.add_argument("--dataset-uri", required=True, help="a prepared dataset (data prep's dataset_uri)")
    experiment.add_argument("--name", default="sam3pipe-sweep", help="the Experiment's name (the MLflow sweep id)")
    experiment.add_argument("--namespace", default="", help="the Experiment's namespace (default: kubectl's)")
    experiment.add_argument("--output", type=Path, default=Path("experiment.yaml"))
    experiment.add_argument("parameters", nargs="*", metavar="name=value")
    with_settings(experiment)
    _with_parallelism(experiment)


def _compile(args: argparse.Namespace, settings: PipelineSettings) -> None:
    """`sam3pipe compile`: the `name=value` pairs (checked) become the package's defaults."""
    from pipeline.arguments import parse_arguments
    from pipeline.compile import compile_pipeline
    from sam3_core import pipeline_parameters as table

    spec = _sweep_spec(args)
    defaults = parse_arguments(table.RUN if spec is None else table.SWEEP, args.parameters, spec)
    print(json.dumps({"pipeline": str(compile_pipeline(settings, args.output, spec, defaults))}))


def _compile_experiment(args: argparse.Namespace, settings: PipelineSettings) -> None:
    import yaml

    from pipeline import katib
    from pipeline.sweep import load_spec

    spec = load_spec(args.spec)
    if spec["sweep_trials"]:
        raise InputError(args.spec[:80], "sweep", "Katib searches a grid: give the spec as {setting: [values]}")
    base, metric, mode = katib.parse_parameters(args.parameters)
    experiment = katib.build_experiment(
        settings, args.name, args.namespace, spec["sweep_grid"], args.dataset_uri, base, metric, mode
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(yaml.safe_dump(experiment, sort_keys=False), encoding="utf-8")
    print(json.dumps({"experiment": str(args.output), "trials": experiment["spec"]["maxTrialCount"]}))


def _sweep_settings(args: argparse.Namespace) -> list[str]:
    """`--parallelism N` is the setting sweep.parallelism (KFP's spec holds it as a number)."""
    return [*args.settings, *([f"sweep.parallelism={args.parallelism}"] if args.parallelism is not None else [])]


def _sweep_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """compile / submit: the `--sweep` spec's arguments, or None for the plain pipeline."""
    from pipeline.sweep import load_spec

    if args.sweep is None and args.parallelism is not None:
        raise InputError("command line", "--parallelism", "applies to sweeps only; add --sweep SPEC")
    return None if args.sweep is None else load_spec(args.sweep)


def _run_sweep(args: argparse.Namespace, settings: PipelineSettings) -> None:
    """`sam3pipe sweep --local`: the sweep's table, then its best trial as one JSON line."""
    from pipeline.local import run_local_sweep
    from pipeline.sweep import load_spec
    from sam3_core import storage

    outcome = run_local_sweep(settings, load_spec(args.spec), args.parameters, args.pipeline_root)
    print(storage.read_text(outcome["summary_uri"]))
    print(_mlflow_hint())
    print(json.dumps(outcome, sort_keys=True))


def _add_reproduce(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reproduce = commands.add_parser(
        "reproduce", help="rerun a run exactly as MLflow recorded it and report the metric differences"
    )
    reproduce.add_argument(
        "run", help="MLflow run id (a pipeline run or a train/predict/evaluate run) or pipeline run id"
    )
    reproduce.add_argument(
        "--allow-other-commit", action="store_true", help="rerun although the code (git commit, sam3) differs"
    )
    reproduce.add_argument("--dry-run", action="store_true", help="check and print the commands, run nothing")
    reproduce.add_argument("--host", default=None, help="submit the pipeline run to this Kubeflow Pipelines API")
    reproduce.add_argument("--wait", action="store_true", help="with --host: wait for the run and compare metrics")
    reproduce.add_argument("--existing-token", default=None, help="with --host: bearer token (env KFP_EXISTING_TOKEN)")
    reproduce.add_argument(
        "parameters", nargs="*", metavar="name=value", help="with --host: pipeline parameters to set"
    )


def _reproduce(args: argparse.Namespace) -> int:
    from pipeline.reproduce import reproduce

    result = reproduce(
        args.run,
        allow_other_commit=args.allow_other_commit,
        dry_run=args.dry_run,
        host=args.host,
        wait=args.wait,
        parameters=args.parameters,
        existing_token=args.existing_token,
    )
    print(json.dumps(result))
    return 0


def _ui(port: int) -> NoReturn:
    from sam3_core import mlflow_records

    command = mlflow_records.ui_command(port)
    url = mlflow_records.local_runs_table_url(port)
    logger.info("starting: %s", " ".join(command))
    print(f"Runs table with the headline columns (open once the server is up): {url}", flush=True)
    os.execvp(command[0], command)


def _run(args: argparse.Namespace) -> int:
    # kfp and the components are imported per command: a component run never loads kfp, and
    # compile/submit never load torch
    if args.command == "component":
        return component_module(args.component).main(args.overrides)
    if args.command == "ui":
        _ui(args.port)
    if args.command == "reproduce":
        return _reproduce(args)

    from pipeline.settings import load_settings

    settings = load_settings(_sweep_settings(args) if hasattr(args, "parallelism") else args.settings)
    if args.command == "compile":
        _compile(args, settings)
    elif args.command == "submit":
        from pipeline.submit import submit

        result = submit(
            settings,
            args.host,
            args.parameters,
            args.experiment,
            args.namespace,
            args.run_name,
            args.service_account,
            args.existing_token,
            enable_caching=False if args.no_cache else None,
            sweep=_sweep_spec(args),
        )
        print(json.dumps(result))
    elif args.command == "sweep":
        _run_sweep(args, settings)
    elif args.command == "compile-experiment":
        _compile_experiment(args, settings)
    elif args.command == "render-job":
        from pipeline.render import render_job, to_yaml

        print(to_yaml(render_job(args.kind, settings, args.parameters)), end="")
    else:
        from pipeline.local import metrics_table, run_local

        if args.runner == "docker":
            from pipeline.docker_runner import docker_runner

            with docker_runner(settings.image) as runner:
                metrics = run_local(settings, args.parameters, args.pipeline_root, runner)
        else:
            metrics = run_local(settings, args.parameters, args.pipeline_root)
        print(metrics_table(metrics))
        print(f"\n{_mlflow_hint()}")
    return 0


def _mlflow_hint() -> str:
    """How to open the runs just logged: `make ui` on the local store, else the server's URI."""
    from sam3_core import mlflow_records

    try:
        return f"Compare runs in the MLflow UI: make ui   (runs: {' '.join(mlflow_records.ui_command())})"
    except ConfigError:
        return f"Compare runs in the MLflow UI at {mlflow_records.redact_text(mlflow_records.tracking_uri())}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; `name=value` parameters may come before and after a command's options."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse takes a command's positionals in one run, so parameters after an option land in `rest`
    if rest and hasattr(args, "parameters") and all("=" in arg and not arg.startswith("-") for arg in rest):
        args.parameters = [*args.parameters, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Errors the user can fix (ours, the operating system's on their paths, running out of memory) are
    one masked `error:` line and exit 2, as in the components (components/runner.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    configure_console(argv)
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error (status 2) or the help (0)
        return int(exc.code or 0)
    try:
        return _run(args)
    except KeyboardInterrupt:
        logger.error("error: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        logger.error("error: %s", message)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
