"""RLE checks: every mask pycocotools encodes passes; every truncation or corruption is caught."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3_core.evaluate.rle import areas, first_malformed


def random_masks(count: int, seed: int = 0) -> list[dict]:
    """Noise, blobs and full / empty masks of varied sizes: long and short runs, both signs of run deltas."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = (int(v) for v in rng.integers(1, 90, size=2))
        kind = i % 4
        if kind == 0:
            mask = rng.random((h, w)) < rng.random()
        elif kind == 1:
            mask = np.zeros((h, w), dtype=bool)
            mask[rng.integers(h) :, rng.integers(w) :] = True
        else:
            mask = np.full((h, w), kind == 2)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        out.append({"size": [h, w], "counts": rle["counts"].decode("ascii")})
    return out


def test_every_mask_pycocotools_encodes_is_well_formed():
    assert first_malformed(random_masks(400)) is None


def test_a_large_mask_with_runs_of_many_characters_is_well_formed():
    mask = np.zeros((2000, 3000), dtype=np.uint8, order="F")
    mask[700:1900, 5:2990] = 1
    rle = mask_utils.encode(mask)

    assert first_malformed([{"size": [2000, 3000], "counts": rle["counts"]}]) is None


def test_every_truncation_of_a_mask_is_malformed():
    masks = random_masks(24, seed=1)
    cut = [{"size": m["size"], "counts": m["counts"][:n]} for m in masks for n in range(len(m["counts"]))]

    flagged = [i for i in range(len(cut)) if first_malformed([cut[i]]) is not None]

    assert len(flagged) == len(cut)


def test_the_first_malformed_mask_is_named_with_the_reason():
    masks = random_masks(10)
    masks[6] = {"size": masks[6]["size"], "counts": masks[6]["counts"] + "1"}  # one more pixel

    index, reason = first_malformed(masks)

    assert index == 6 and "height * width" in reason


@pytest.mark.parametrize(
    ("rle", "reason"),
    [
        ({"size": [2, 3], "counts": [1, 2, 3]}, None),
        ({"size": [2, 3], "counts": [1, 2]}, "add up to 3 pixels"),
        ({"size": [2, 3], "counts": [1, -2, 7]}, "non-negative"),
        ({"size": [2, 3], "counts": "0~"}, "truncated or corrupted"),  # a character outside '0'..'o'
        ({"size": [2, "3"], "counts": "06"}, "size"),
        ({"counts": "06"}, "RLE object"),
        ({"size": [2, 3], "counts": 6}, "string or a list"),
    ],
)
def test_malformed_rles_are_named_with_what_is_wrong(rle, reason):
    result = first_malformed([rle])

    assert (result is None) if reason is None else (reason in result[1])


def test_areas_measure_any_number_of_masks():
    masks = random_masks(600, seed=2)  # pycocotools' own area() refuses more than 255 at once

    assert areas(masks).tolist() == [float(mask_utils.area(m)) for m in masks]
