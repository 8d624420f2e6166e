"""Read a published dataset's frames and annotations from any store, each file fetched at most once.

Training reads every frame many times; from s3:// that must not mean a download per read. Each
file goes through `storage.cached_path`, checked against the manifest's sha256 when first
fetched, and the local path is remembered for the rest of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from sam3_core import storage
from sam3_core.data.prep import MANIFEST, SPLITS
from sam3_core.data.ytvis import VideoDataset, read_annotation_json, validate
from sam3_core.errors import InputError, StorageError


class FrameReader:
    """Frames and split annotations of the dataset published at `dataset_uri`."""

    def __init__(self, dataset_uri: str, cache_dir: str | Path | None = None) -> None:
        self.dataset_uri = dataset_uri
        self.cache_dir = cache_dir
        if not storage.is_published(dataset_uri, MANIFEST):
            raise InputError(dataset_uri, MANIFEST, "no published dataset here; run data_prep and pass its dataset_uri")
        self.manifest: dict[str, Any] = storage.read_json(storage.join(dataset_uri, MANIFEST))
        self._paths: dict[str, Path] = {}

    @property
    def dataset_id(self) -> str:
        return str(self.manifest["dataset_id"])

    def local_path(self, rel: str) -> Path:
        """A verified local copy of a dataset file (`frames/3/00000.png`, `train.json`, ...)."""
        if rel not in self._paths:
            entry = self.manifest["files"].get(rel)
            if entry is None:
                raise InputError(self.dataset_uri, rel, "not listed in the dataset manifest")
            uri = storage.join(self.dataset_uri, rel)
            try:
                self._paths[rel] = storage.cached_path(uri, self.cache_dir, sha256=entry["sha256"])
            except StorageError as exc:
                raise InputError(self.dataset_uri, rel, f"cannot be read ({exc}); re-run data_prep") from exc
        return self._paths[rel]

    def image(self, file_name: str) -> Image.Image:
        """The frame as an RGB image; `file_name` as written in the split's annotations."""
        with Image.open(self.local_path(file_name)) as image:
            return image.convert("RGB")

    def dataset(self, split: str) -> VideoDataset:
        """The `train` or `val` annotations."""
        if split not in SPLITS:
            raise InputError(self.dataset_uri, "split", f"unknown split {split!r}; use one of {list(SPLITS)}")
        rel = f"{split}.json"
        return validate(read_annotation_json(str(self.local_path(rel))), storage.join(self.dataset_uri, rel))
