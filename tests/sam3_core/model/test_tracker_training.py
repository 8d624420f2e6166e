"""The tracker's training forward: conditioning frames first, memory, corrective clicks, gradients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sam3_core.data.synthetic import SyntheticConfig, render_video, track_from_masks
from sam3_core.data.tracker_clips import (
    NEGATIVE,
    POSITIVE,
    TrackerClip,
    TrackerClipConfig,
    TrackerClipDataset,
    collate_tracker_clips,
)
from sam3_core.data.ytvis import Category, Video, VideoDataset
from sam3_core.errors import InputError
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker import TRACKER_NECK_PREFIX
from sam3_core.model.tracker_training import (
    TrackingSettings,
    build_video_clip_model,
    error_click,
    load_tracker_weights,
    prepare_tracker,
    track_clips,
)
from sam3_core.train.tracker_loss import TrackerLoss, TrackerLossConfig

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def models(torch_single_thread: None) -> tuple[nn.Module, nn.Module]:
    """The tiny preset's detector (with the tracker's neck) and tracker, at 56 px."""
    model = build_video_clip_model(ModelConfig(image_size=IMAGE_SIZE, vit_pretrain_img_size=IMAGE_SIZE))
    prepare_tracker(model.tracker, TrackingSettings(), seed=0)
    return model.detector.train(), model.tracker.train()


@pytest.fixture(scope="module")
def dataset() -> tuple[VideoDataset, dict[str, np.ndarray]]:
    cfg = SyntheticConfig(
        num_videos=1, frames_per_video=6, height=64, width=64, min_objects=2, min_size=14, max_size=30
    )
    rendered = render_video(cfg, 0)
    frames = {f"1/{t:05d}.png": frame for t, frame in enumerate(rendered.frames)}
    tracks = [track_from_masks(k + 1, 1, 1, o.visible_masks) for k, o in enumerate(rendered.objects)]
    return VideoDataset([Video(1, 64, 64, tuple(frames))], tracks, [Category(1, "shape")]), frames


def clip(dataset: tuple[VideoDataset, dict[str, np.ndarray]], **changes: object) -> TrackerClip:
    videos, frames = dataset
    cfg = dataclasses.replace(TrackerClipConfig(frames_per_clip=4, correction_points=3), **changes)
    return TrackerClipDataset(videos, frames.__getitem__, cfg, IMAGE_SIZE, seed=0)[0]


def run(models: tuple[nn.Module, nn.Module], clips: list[TrackerClip]):
    detector, tracker = models
    return track_clips(detector.backbone, tracker, collate_tracker_clips(clips), backbone_grad=False)


def test_every_frame_is_predicted_and_corrected_frames_keep_every_click_step(models, dataset) -> None:
    one = clip(dataset, point_prob=1.0, max_cond_frames=1, max_correct_frames=2)
    (frames,) = run(models, [one])
    assert sorted(frames) == [0, 1, 2, 3]
    for t, steps in frames.items():
        assert len(steps.multimasks) == (4 if t in one.correct_frames else 1)
        assert steps.multimasks[0].shape[0] == len(one.track_ids)
        assert steps.multimasks[0].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def test_a_mask_prompted_conditioning_frame_outputs_its_prompt(models, dataset) -> None:
    one = clip(dataset, point_prob=0.0, max_cond_frames=1)
    (frames,) = run(models, [one])
    assert torch.equal(frames[0].final_mask > 0, one.masks[0])


def test_a_tracked_frame_depends_on_the_conditioning_frames_prompt(models, dataset) -> None:
    """Memory carries the prompt forward: another first-frame mask changes the next frame's prediction."""
    one = clip(dataset, point_prob=0.0, max_cond_frames=1)
    other = dataclasses.replace(one, masks=one.masks.clone())
    other.masks[0] = torch.roll(other.masks[0], shifts=10, dims=-1)
    with torch.no_grad():
        (a,) = run(models, [one])
        (b,) = run(models, [other])
    assert not torch.equal(a[1].final_mask, b[1].final_mask)


def test_the_same_clip_gives_the_same_predictions_clicks_included(models, dataset) -> None:
    one = clip(dataset, point_prob=1.0, box_prob=0.0)
    with torch.no_grad():
        (a,) = run(models, [one])
        (b,) = run(models, [one])
    for t in a:
        assert all(torch.equal(x, y) for x, y in zip(a[t].multimasks, b[t].multimasks))


def test_the_loss_reaches_memory_attention_memory_encoder_and_mask_decoder_but_not_the_detector(
    models, dataset
) -> None:
    detector, tracker = models
    one = clip(dataset, point_prob=0.0, max_cond_frames=1)
    tracker.zero_grad(set_to_none=True)
    detector.zero_grad(set_to_none=True)
    losses = TrackerLoss(TrackerLossConfig())(run(models, [one]), [one.masks])
    losses["loss"].backward()
    for prefix in ("transformer.encoder", "maskmem_backbone", "sam_mask_decoder", "obj_ptr_proj"):
        grads = [p.grad for n, p in tracker.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    assert all(p.grad is None for p in detector.parameters())


def test_an_error_click_corrects_the_error_it_lands_on() -> None:
    gt = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:6, 2:6] = True
    pred = torch.zeros_like(gt)
    pred[1, :, 0:2, 0:2] = True  # object 1: a false positive corner, and the whole object missed
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        points, labels = error_click(gt, pred, generator)
        for k in range(2):
            x, y = (int(v) for v in points[k, 0])
            assert int(labels[k, 0]) == (POSITIVE if gt[k, 0, y, x] else NEGATIVE)
            assert gt[k, 0, y, x] != pred[k, 0, y, x]


def test_a_click_on_a_perfect_prediction_is_negative_on_the_background_and_a_ground_truth_click_is_positive() -> None:
    gt = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    gt[:, :, 2:6, 2:6] = True
    generator = torch.Generator().manual_seed(0)
    points, labels = error_click(gt, gt.clone(), generator)
    x, y = (int(v) for v in points[0, 0])
    assert int(labels[0, 0]) == NEGATIVE and not gt[0, 0, y, x]
    points, labels = error_click(gt, None, generator)
    x, y = (int(v) for v in points[0, 0])
    assert int(labels[0, 0]) == POSITIVE and gt[0, 0, y, x]


def _tracker_part(key: str) -> bool:
    return key.startswith(("tracker.", TRACKER_NECK_PREFIX))


@pytest.mark.integration
def test_a_tracker_start_takes_the_whole_tracker_and_its_neck_and_no_detector_weight(
    tmp_path, torch_single_thread
) -> None:
    tiny = ModelConfig(image_size=IMAGE_SIZE, vit_pretrain_img_size=IMAGE_SIZE)
    module = build_video_clip_model(tiny)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    source = build_video_clip_model(dataclasses.replace(tiny, init_seed=3)).state_dict()
    uri = str(tmp_path / "sam3.pt")
    save_checkpoint(source, uri, step=0)  # flat, as SAM3's sam3.pt
    load_tracker_weights(module, uri)
    after = module.state_dict()
    assert all(torch.equal(after[k], source[k]) for k in after if _tracker_part(k))
    assert all(torch.equal(after[k], before[k]) for k in after if not _tracker_part(k))
    assert not all(torch.equal(source[k], before[k]) for k in after if _tracker_part(k))


@pytest.mark.integration
def test_a_tracker_start_without_a_tracker_is_refused_naming_a_missing_weight(tmp_path, torch_single_thread) -> None:
    module = build_video_clip_model(ModelConfig(image_size=IMAGE_SIZE, vit_pretrain_img_size=IMAGE_SIZE))
    detector_only = {k: v for k, v in module.state_dict().items() if not _tracker_part(k)}
    uri = str(tmp_path / "detector.pt")
    save_checkpoint({"model": detector_only}, uri, step=0)
    with pytest.raises(InputError, match=r"detector\.pt: \S+: missing, with \d+ more tracker weights"):
        load_tracker_weights(module, uri)
