"""The run folder `<store>/runs/<run_name>/`: its name, its files, and whether a config may resume it.

The derived run name hashes every key that shapes the run (weights, data order, checkpoint
selection), so rerunning a command finds its run again and a changed value starts another.
Keys that cannot change what is trained (tracking, thread count, logging period, where
checkpoints are copied, local caches) are left out: changing them still resumes. An explicit
`output.run_name` whose stored config differs in a shaping key is refused, naming the keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import yaml

from sam3_core import storage
from sam3_core.config import flatten, to_yaml
from sam3_core.errors import ConfigError
from sam3_core.train.config import TrainConfig

log = logging.getLogger(__name__)
# dotted keys (or key prefixes) that do not change what a run trains
RUN_NEUTRAL_KEYS = (
    "mlflow.",
    "output.",
    "train.resume",
    "train.num_threads",
    "train.dist_timeout_s",
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


def check_same_config(cfg: TrainConfig, run: RunFolder) -> None:
    """Refuse to continue in a run folder whose stored config shapes another run."""
    if not storage.exists(run.config_uri):
        return
    stored = yaml.safe_load(storage.read_text(run.config_uri))
    differences = config_differences(flatten(stored or {}), flatten(cfg))
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise ConfigError(
            f"output.run_name: the run at {run.uri} was trained with another config ({shown}); "
            "choose another output.run_name, or leave it empty to derive one from the config"
        )


def write_config(cfg: TrainConfig, run: RunFolder) -> None:
    storage.write_text(run.config_uri, to_yaml(cfg))
    log.info("run folder %s", run.uri)
