"""Read a published dataset's frames and annotations from any store, through a bounded local cache.

Training reads every frame many times; from s3:// that must not mean a download per read, nor
a full copy of a dataset that may be larger than the local disk. Frames go through a
`storage.ReadCache`: kept locally up to `cache_bytes` (least recently used evicted first,
shared by every DataLoader worker and rank of the machine), checked against the manifest's
sha256, and handed out as bytes. A local dataset is read in place.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

from sam3_core import storage
from sam3_core.data.prep import MANIFEST, SPLITS
from sam3_core.data.ytvis import VideoDataset, read_annotation_json, validate
from sam3_core.errors import ConfigError, InputError, StorageError, StoreUnreachableError, working_on

# what repairs a published dataset whose files no longer match its manifest
REPAIR = "run the data prep that made it again with overwrite=true to publish it again"


class FrameReader:
    """Frames and split annotations of the dataset published at `dataset_uri`.

    ``cache_bytes``: the most bytes of frames kept in the local cache (0: no limit). Picklable,
    so DataLoader workers each get a copy sharing the same cache folder.
    """

    def __init__(self, dataset_uri: str, cache_dir: str | Path | None = None, cache_bytes: int = 0) -> None:
        self.dataset_uri = dataset_uri
        self.cache_dir = cache_dir
        if not storage.is_published(dataset_uri, MANIFEST):
            raise InputError(dataset_uri, MANIFEST, "no published dataset here; run data_prep and pass its dataset_uri")
        self.manifest: dict[str, Any] = storage.read_json(storage.join(dataset_uri, MANIFEST))
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("files"), dict):
            raise InputError(dataset_uri, MANIFEST, f"not a dataset manifest; {REPAIR}")
        if storage.is_remote(dataset_uri):
            _check_cache_dir(cache_dir)
        self.cache = storage.ReadCache(cache_dir, cache_bytes)
        self._paths: dict[str, Path] = {}

    @property
    def dataset_id(self) -> str:
        return str(self.manifest["dataset_id"])

    def _entry(self, rel: str) -> dict[str, Any]:
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise InputError(self.dataset_uri, rel, "not listed in the dataset manifest")
        return entry

    def local_path(self, rel: str) -> Path:
        """A verified local copy of a dataset file (`train.json`, ...), kept for the whole run."""
        if rel not in self._paths:
            entry = self._entry(rel)
            try:
                self._paths[rel] = storage.cached_path(
                    storage.join(self.dataset_uri, rel), self.cache_dir, entry["sha256"]
                )
            except StoreUnreachableError:
                raise
            except StorageError as exc:
                raise InputError(self.dataset_uri, rel, f"cannot be read ({exc}); {REPAIR}") from exc
        return self._paths[rel]

    def read_bytes(self, rel: str) -> bytes:
        """A dataset file's verified bytes, through the bounded cache."""
        entry = self._entry(rel)
        try:
            return self.cache.read_bytes(storage.join(self.dataset_uri, rel), entry["sha256"])
        except StoreUnreachableError:
            raise
        except StorageError as exc:
            raise InputError(self.dataset_uri, rel, f"cannot be read ({exc}); {REPAIR}") from exc

    def image(self, file_name: str) -> Image.Image:
        """The frame as an RGB image; `file_name` as written in the split's annotations."""
        data = self.read_bytes(file_name)
        try:
            with working_on(f"{self.dataset_uri}/{file_name}"), Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise InputError(self.dataset_uri, file_name, f"not a readable image ({exc}); {REPAIR}") from exc

    def dataset(self, split: str) -> VideoDataset:
        """The `train` or `val` annotations."""
        if split not in SPLITS:
            raise InputError(self.dataset_uri, "split", f"unknown split {split!r}; use one of {list(SPLITS)}")
        rel = f"{split}.json"
        return validate(read_annotation_json(str(self.local_path(rel))), storage.join(self.dataset_uri, rel))


def _check_cache_dir(cache_dir: str | Path | None) -> None:
    """The cache folder for a remote dataset must be a folder this process can write (checked up front,
    so a bad cache is named as such rather than blamed on the dataset)."""
    root = storage.cache_root(cache_dir)
    key = "data.cache_dir" if cache_dir is not None else "SAM3PIPE_CACHE"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{key}={str(root)!r}: cannot be used as the local cache folder ({exc.strerror or exc})"
        ) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(root)!r}: the local cache folder is not writable; choose another folder")
