"""Resizing for data prep: masks equal to format version 1's Pillow path, frames decoded completely."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from sam3_core.data.resample import check_frame_bytes, coefficients, encode_frame, resample_mask, resize_frame
from sam3_core.data.ytvis import RLE, mask_to_rle, rle_runs, rle_to_mask


def pillow_resample(rle: RLE, width: int, height: int) -> RLE:
    """Format version 1's resampling, kept verbatim: full decode, float32 image, Pillow bilinear, >= 0.5."""
    coverage = Image.fromarray(rle_to_mask(rle).astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return mask_to_rle(np.asarray(coverage) >= 0.5)


def varied_masks(height: int, width: int, seed: int) -> list[np.ndarray]:
    """Shapes a video annotation holds: blobs, polygons, boxes, holes, thin lines, speckle, edges, full, empty-ish."""
    rng = np.random.default_rng(seed)
    masks = []
    for kind in range(14):
        mask = np.zeros((height, width), dtype=np.uint8)
        if kind in (0, 1):
            center = (int(rng.uniform(-0.2, 1.2) * width), int(rng.uniform(-0.2, 1.2) * height))
            axes = (max(1, int(rng.uniform(0.02, 0.6) * width)), max(1, int(rng.uniform(0.02, 0.6) * height)))
            cv2.ellipse(mask, center, axes, rng.uniform(0, 180), 0, 360, 1, -1)
        elif kind in (2, 3):
            points = (rng.random((int(rng.integers(3, 12)), 2)) * [width, height]).astype(np.int32)
            cv2.fillPoly(mask, [points], 1)
        elif kind == 4:
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            mask[y0 : y0 + int(rng.integers(1, height + 1)), x0 : x0 + int(rng.integers(1, width + 1))] = 1
        elif kind == 5:
            cv2.circle(mask, (width // 2, height // 2), max(2, min(width, height) // 3), 1, -1)
            cv2.circle(mask, (width // 2, height // 2), max(1, min(width, height) // 6), 0, -1)
        elif kind == 6:
            cv2.line(mask, (0, int(rng.integers(0, height))), (width - 1, int(rng.integers(0, height))), 1, 1)
        elif kind == 7:
            mask[:] = rng.random((height, width)) < 0.3
        elif kind == 8:
            mask[:, : max(1, width // 3)] = 1
        elif kind == 9:
            mask[: max(1, height // 5)] = 1
            mask[-1] = 1
        elif kind == 10:
            mask[:] = 1
        elif kind == 11:
            mask[int(rng.integers(0, height)), int(rng.integers(0, width))] = 1
        elif kind == 12:
            mask[::3, ::2] = 1
        else:
            mask[:, -1] = 1
            mask[0, :] = 1
        masks.append(mask.astype(bool))
    return masks


SIZES = [
    ((720, 1280), (126, 224)),  # SA-Co/VEval frames at resize_max_side=224
    ((480, 854), (224, 398)),
    ((40, 80), (20, 40)),  # exact halving: coverages of exactly 0.5
    ((37, 53), (29, 41)),
    ((33, 17), (7, 4)),
    ((100, 100), (100, 50)),  # one axis unchanged: Pillow skips that pass
    ((100, 100), (60, 100)),
    ((64, 48), (128, 96)),  # enlarging
]


@pytest.mark.parametrize(("source", "target"), SIZES, ids=[f"{s[1]}x{s[0]}->{t[1]}x{t[0]}" for s, t in SIZES])
def test_resampled_masks_equal_the_pillow_path_of_format_version_1(
    source: tuple[int, int], target: tuple[int, int]
) -> None:
    (height, width), (out_h, out_w) = source, target
    for seed in range(3):
        for i, mask in enumerate(varied_masks(height, width, seed)):
            rle = mask_to_rle(mask)
            assert resample_mask(rle, out_w, out_h) == pillow_resample(rle, out_w, out_h), f"seed {seed} mask {i}"


def test_an_empty_mask_stays_empty() -> None:
    rle = mask_to_rle(np.zeros((30, 40), dtype=bool))
    assert not rle_to_mask(resample_mask(rle, 20, 15)).any()


def test_filter_windows_are_pillows_for_a_downscale() -> None:
    coeffs = coefficients(1280, 224)
    # support = scale = 1280 / 224; each window holds at most 2 * ceil(support) + 1 taps and sums to 1
    assert coeffs.weights.shape == (224, 13)
    assert np.allclose(coeffs.weights.sum(axis=1), 1.0)
    assert coeffs.start[0] == 0 and coeffs.end[-1] == 1280
    assert (coeffs.full == np.float32(1.0)).all()


@pytest.mark.parametrize("counts", ["P", "0P", "/", "a\u00e9", "\x7f", "PPPPPPP0"])
def test_malformed_rle_strings_are_detected(counts: str) -> None:
    # an unfinished value, characters outside COCO's alphabet, a run too long for any image
    assert rle_runs(counts) is None


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_a_resized_frame_has_the_target_size_and_reports_its_own() -> None:
    frame = np.random.default_rng(0).integers(0, 255, (360, 640, 3), dtype=np.uint8)
    image, size = resize_frame(jpeg(frame), 224, 126)
    assert image.size == (224, 126) and image.mode == "RGB" and size == (640, 360)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_a_truncated_jpeg_is_refused_whether_resized_or_kept(keep: float) -> None:
    data = jpeg(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    cut = data[: int(len(data) * keep)]
    with pytest.raises(OSError, match="truncated"):
        resize_frame(cut, 80, 60)
    with pytest.raises(OSError, match="truncated"):
        check_frame_bytes(cut)


def test_frames_are_jpeg_unless_lossless_png_is_asked_for() -> None:
    image = Image.fromarray(np.full((10, 20, 3), 128, dtype=np.uint8))
    data, suffix = encode_frame(image, "jpeg", 90)
    assert suffix == ".jpg" and Image.open(io.BytesIO(data)).format == "JPEG"
    data, suffix = encode_frame(image, "png", 90)
    assert suffix == ".png" and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
