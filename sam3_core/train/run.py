"""The run folder `<store>/runs/<run_name>/`: its name, its files, and whether a config may resume it.

The derived run name hashes every key that shapes the run (weights, data order, checkpoint
selection), so rerunning a command finds its run again and a changed value starts another.
Keys that cannot change what is trained (tracking, thread count, logging period, where
checkpoints are copied, local caches) are left out: changing them still resumes.

A folder that holds what a training wrote (checkpoints, `metrics.jsonl`) is the earlier output of
the config in its `config.yaml`, and is never replaced silently (`prepare_run`): another config
(a named run), `train.resume=false`, or training outputs without a readable `config.yaml` are
refused unless `output.overwrite=true`, which starts the run over. A folder holding only a
`config.yaml` (a run that stopped before it saved anything) is taken over by the next config.
A `last.pt` is checked before it is resumed (`check_resume_state`): a training checkpoint of this
model whose step the run can have reached.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from sam3_core import comm, storage
from sam3_core.config import flatten, to_yaml
from sam3_core.errors import ConfigError, InputError
from sam3_core.outputs import Output, check_outputs
from sam3_core.train.config import TrainConfig

log = logging.getLogger(__name__)
# dotted keys (or key prefixes) that do not change what a run trains
RUN_NEUTRAL_KEYS = (
    "mlflow.",
    "output.",
    "train.resume",
    "train.num_threads",
    "train.deterministic",
    "train.dist_timeout_s",
    "train.upload_timeout_s",
    "train.ddp_find_unused_parameters",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_step_checkpoints",
    "data.cache_dir",
    "data.num_workers",
)


# keys that do not reach the run at a given train.stage: stage detector builds no tracker (and a run
# of it keeps the name it had before stages existed), stage tracker uses neither detector clips nor the detector's loss
STAGE_NEUTRAL_KEYS = {
    "detector": ("train.stage", "data.tracker_clips.", "tracker_train.", "model.tracker."),
    "tracker": ("data.clips.", "loss."),
    "joint": (),
}


def _neutral(key: str, neutral_keys: tuple[str, ...]) -> bool:
    return any(key == neutral or (neutral.endswith(".") and key.startswith(neutral)) for neutral in neutral_keys)


def shaping_values(flat: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys of a flattened train config that shape the run."""
    neutral = RUN_NEUTRAL_KEYS + STAGE_NEUTRAL_KEYS.get(flat.get("train.stage", "detector"), ())
    return {key: value for key, value in flat.items() if not _neutral(key, neutral)}


def run_name_for(cfg: TrainConfig) -> str:
    """`train-<hash of the shaping keys>`: the same command finds its run folder again."""
    shaped = json.dumps(shaping_values(flatten(cfg)), sort_keys=True, default=str)
    return "train-" + hashlib.sha256(shaped.encode()).hexdigest()[:12]


def run_uri_for(cfg: TrainConfig) -> str:
    return storage.join(cfg.output.store, "runs", cfg.output.run_name or run_name_for(cfg))


@dataclass(frozen=True)
class RunFolder:
    """The URIs of one run's files."""

    uri: str

    @property
    def config_uri(self) -> str:
        return storage.join(self.uri, "config.yaml")

    @property
    def metrics_uri(self) -> str:
        return storage.join(self.uri, "metrics.jsonl")

    @property
    def checkpoints_uri(self) -> str:
        return storage.join(self.uri, "checkpoints")

    @property
    def last_uri(self) -> str:
        return storage.join(self.checkpoints_uri, "last.pt")

    @property
    def best_uri(self) -> str:
        return storage.join(self.checkpoints_uri, "best.pt")

    def step_uri(self, step: int) -> str:
        return storage.join(self.checkpoints_uri, f"step_{step:07d}.pt")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: stored -> current` for every shaping key whose value differs (or exists on one side only)."""
    old, new = shaping_values(stored), shaping_values(current)
    missing = object()

    def shown(values: dict[str, Any], key: str) -> str:
        return _short(values[key]) if key in values else "absent"

    return [
        f"{key}: {shown(old, key)} -> {shown(new, key)}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


# what a checkpoint of `Trainer.state_dict` holds
RESUME_KEYS = ("model", "optimizer", "scheduler", "step", "data", "rng", "world_size", "hooks", "history")


def _stored_config(run: RunFolder) -> dict[str, Any]:
    try:
        stored = yaml.safe_load(storage.read_text(run.config_uri))
    except (yaml.YAMLError, InputError, RecursionError) as exc:
        raise InputError(
            run.config_uri,
            "config.yaml",
            f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): the config that trained "
            "this run is unknown; restore it, or pass output.overwrite=true to start the run over",
        ) from None
    if not isinstance(stored, dict):
        raise InputError(
            run.config_uri,
            "config.yaml",
            f"holds a {type(stored).__name__}, not a config; restore it, or pass output.overwrite=true to start over",
        )
    return stored


def trained_files(run: RunFolder) -> list[str]:
    """What a training wrote into the folder (checkpoints, metrics.jsonl), as URIs."""
    found = [storage.join(run.checkpoints_uri, rel) for rel in storage.list_files(run.checkpoints_uri)]
    if storage.exists(run.metrics_uri):
        found.append(run.metrics_uri)
    return found


def _differences_line(differences: list[str]) -> str:
    return "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")


def check_same_config(cfg: TrainConfig, run: RunFolder) -> bool:
    """Refuse to continue a trained run folder whose stored config shapes another run; True when it
    holds training outputs (see the module doc; `output.overwrite=true` lifts every refusal)."""
    overwrite = cfg.output.overwrite
    trained = bool(trained_files(run))
    has_config = storage.exists(run.config_uri)
    if trained and not has_config and not overwrite:
        raise InputError(
            run.uri,
            "config.yaml",
            "missing, but the folder holds checkpoints: the config that trained them is unknown, so it cannot be "
            "resumed safely; restore config.yaml, or pass output.overwrite=true to start the run over",
        )
    if has_config and not overwrite:
        differences = config_differences(flatten(_stored_config(run)), flatten(cfg))
        if differences and trained:
            raise ConfigError(
                f"output.run_name: the run at {run.uri} was trained with another config "
                f"({_differences_line(differences)}); choose another output.run_name, leave it empty to derive "
                "one from the config, or pass output.overwrite=true to replace that run"
            )
        if differences:
            log.info("%s holds only the config of a run that saved nothing; this config takes it over", run.uri)
    if trained and not cfg.train.resume and not overwrite:
        raise ConfigError(
            f"train.resume=false: the run at {run.uri} already holds checkpoints and metrics that logged models and "
            "the registry point at; pass output.overwrite=true to train it again from the start, or resume it "
            "(train.resume=true)"
        )
    return trained


def prepare_run(cfg: TrainConfig, run: RunFolder) -> bool:
    """Check that the folder may hold this run (the output guard, then `check_same_config`); start it over
    when `output.overwrite=true` replaces earlier outputs. True when resuming from `last.pt`."""
    key = "output.run_name" if cfg.output.run_name else "output.store"
    check_outputs([Output(run.uri, key, folder=True)], {"data.uri": cfg.data.uri, "model.uri": cfg.model.uri or ""})
    trained = check_same_config(cfg, run)
    resuming = cfg.train.resume and storage.exists(run.last_uri)
    start_over = trained and cfg.output.overwrite and not (resuming and _same_config(cfg, run))
    comm.barrier()  # every rank has looked before the main one clears anything
    if start_over:
        if comm.is_main():
            log.warning("output.overwrite=true: removing the earlier training outputs of %s", run.uri)
            storage.delete_prefix(run.checkpoints_uri)
            storage.delete(run.metrics_uri)
            storage.delete(run.config_uri)
        comm.barrier()
        return False
    return resuming


def _same_config(cfg: TrainConfig, run: RunFolder) -> bool:
    if not storage.exists(run.config_uri):
        return False
    try:
        return not config_differences(flatten(_stored_config(run)), flatten(cfg))
    except InputError:
        return False


def check_resume_state(state: Mapping[str, Any], uri: str, max_steps: int, model_state: Mapping[str, Any]) -> None:
    """Refuse a `last.pt` that is not a training checkpoint of this model at a step this run can reach."""
    advice = "pass output.overwrite=true to start the run over"
    missing = [key for key in RESUME_KEYS if key not in state]
    if missing:
        raise InputError(
            uri,
            missing[0],
            f"missing ({len(missing)} of the keys a training checkpoint holds are: {', '.join(missing)}): not a "
            f"resumable checkpoint (an exported best.pt, or damaged); {advice}",
        )
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= max_steps:
        raise InputError(
            uri,
            "step",
            f"{step!r} is impossible for a run of train.max_steps={max_steps}: damaged or not this run's; {advice}",
        )
    weights = state["model"]
    if not isinstance(weights, Mapping):
        raise InputError(uri, "model", f"holds a {type(weights).__name__}, not a state dict; {advice}")
    missing_keys = sorted(set(model_state) - set(weights))
    if missing_keys:
        raise InputError(
            uri,
            missing_keys[0],
            f"missing ({len(missing_keys)} weights of this model are): a checkpoint of another model preset or "
            f"settings; {advice}",
        )
    for key, value in weights.items():
        expected = model_state.get(key)
        if expected is None:
            raise InputError(uri, key, f"not a weight of this model: a checkpoint of another model preset; {advice}")
        if getattr(value, "shape", None) != expected.shape:
            raise InputError(
                uri,
                key,
                f"shape {tuple(getattr(value, 'shape', ()))} does not fit the model's {tuple(expected.shape)}: a "
                f"checkpoint of another model preset; {advice}",
            )


def write_config(cfg: TrainConfig, run: RunFolder) -> None:
    storage.write_text(run.config_uri, to_yaml(cfg))
    log.info("run folder %s", run.uri)
