"""Training reads that scale: frames come from the object store through a bounded local cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.data.clips import ClipConfig, ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.loading import PinningCollate, pin_tensors
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.errors import ConfigError, InputError
from sam3_core.model.checkpoint import load_checkpoint
from sam3_core.train.build import train
from sam3_core.train.config import TrainConfig
from tests.fixtures.datasets import TINY_MODEL, TINY_TRAIN, TINY_VIDEOS


def frame_bytes(uri: str) -> int:
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    return sum(entry["size"] for rel, entry in manifest["files"].items() if rel.startswith("frames/"))


def cached_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "lru").rglob("*") if p.is_file() and p.name != ".lock")


def test_a_cache_smaller_than_the_dataset_trains_to_the_same_weights_as_a_full_one(
    s3_bucket: str, torch_single_thread: None, tmp_path: Path
) -> None:
    store = f"{s3_bucket}/store"
    dataset = prepare_dataset(DataPrepConfig(source="synthetic", synthetic=TINY_VIDEOS, store=store, val_fraction=0.25))
    limit = frame_bytes(dataset.uri) // 5
    common = [
        f"data.uri={dataset.uri}",
        *TINY_MODEL,
        *TINY_TRAIN,
        "train.max_steps=4",
        "train.num_threads=1",
        "mlflow.enabled=false",
    ]
    full = train(
        load_config(
            "train",
            TrainConfig,
            [
                *common,
                f"output.store={tmp_path / 'full'}",
                f"data.cache_dir={tmp_path / 'full-cache'}",
            ],
        )
    )
    # two DataLoader workers share the small cache, evicting while they read
    small = train(
        load_config(
            "train",
            TrainConfig,
            [
                *common,
                f"output.store={tmp_path / 'small'}",
                f"data.cache_dir={tmp_path / 'small-cache'}",
                f"data.cache_bytes={limit}",
                "data.num_workers=2",
            ],
        )
    )

    # the full cache kept every frame the run read: more than twice what the small one may hold
    assert cached_bytes(tmp_path / "full-cache") > 2 * limit
    # each reading process may run up to limit / 16 past the limit before it sweeps
    assert cached_bytes(tmp_path / "small-cache") <= limit + 2 * (limit // 16 + 1)
    a, b = load_checkpoint(full.last_checkpoint_uri)["model"], load_checkpoint(small.last_checkpoint_uri)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_frames_of_a_local_dataset_are_read_in_place_and_checked(tmp_path: Path) -> None:
    dataset = prepare_dataset(DataPrepConfig(source="synthetic", synthetic=TINY_VIDEOS, store=str(tmp_path)))
    reader = FrameReader(dataset.uri, cache_dir=tmp_path / "cache", cache_bytes=1)
    name = reader.dataset("train").videos[0].file_names[0]
    assert reader.image(name).size == (TINY_VIDEOS.width, TINY_VIDEOS.height)
    assert not (tmp_path / "cache").exists()
    (Path(dataset.uri) / name).write_bytes(b"corrupt")
    fresh = FrameReader(dataset.uri, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="sha256 mismatch"):
        fresh.image(name)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.cache_bytes=-1", "data.cache_bytes must be an integer >= 0"),
        ("data.prefetch_factor=-1", "data.prefetch_factor must be an integer >= 0"),
        (["data.num_workers=2", "data.prefetch_factor=0"], "data.prefetch_factor must be an integer >= 1"),
    ],
)
def test_loader_settings_are_checked_when_the_config_is_built(override: str | list[str], message: str) -> None:
    overrides = [override] if isinstance(override, str) else override
    with pytest.raises(ConfigError, match=message):
        load_config("train", TrainConfig, ["data.uri=x", *overrides])


def all_tensors(data: object) -> list[torch.Tensor]:
    """Every tensor reachable through dataclass fields, sequences and dicts."""
    if isinstance(data, torch.Tensor):
        return [data]
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return [t for item in dataclasses.fields(data) for t in all_tensors(getattr(data, item.name))]
    if isinstance(data, (list, tuple)):
        return [t for item in data for t in all_tensors(item)]
    if isinstance(data, dict):
        return [t for value in data.values() for t in all_tensors(value)]
    return []


def test_pinning_reaches_every_tensor_of_a_collated_sam3_batch(tiny_dataset) -> None:  # type: ignore[no-untyped-def]
    reader = FrameReader(tiny_dataset.uri)
    clips = ClipDataset(reader.dataset("train"), lambda n: np.array(reader.image(n)), ClipConfig(), 56, seed=0)
    batch = PinningCollate(collate_clips)([clips[0], clips[1]])
    seen: list[torch.Tensor] = []
    # pinning needs a GPU; a copy stands in for it so the walk over the batch can be checked here
    pinned = pin_tensors(batch.batch, lambda t: seen.append(t) or t.clone())
    assert type(pinned) is type(batch.batch)
    before, after = all_tensors(batch.batch), all_tensors(pinned)
    assert len(before) == len(after) == len(seen) > 10
    assert all(a is not b and torch.equal(a, b) for a, b in zip(before, after, strict=True))
