"""The detector learns what the data says: parity with sam3's own training path, and one clip overfits.

Overfit: the tiny preset trained on one clip puts its highest-scoring query on every object
(box IoU >= 0.8) within a bounded number of steps. This is what the from-scratch model could not
do before its anchors were tiled over the image (`model.anchors`): the matched query's box fitted,
but every query looked the same, so the top-scored one was a random one.

Parity: with one frame per clip, our data path (published dataset -> `ClipDataset` ->
`collate_clips` -> `VideoClipDetector` -> `build_loss`) and sam3's own (its COCO loader,
`Sam3ImageDataset` with its transforms, `collate_fn_api`, `Sam3Image.forward`, a
`Sam3LossWrapper` configured as upstream's fine-tuning config) see the same image and targets
and give the same loss terms on the same weights. Frames are generated at the model's input size,
so neither path resizes (sam3 resizes PIL images with antialiasing, we resize tensors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sam3_core.config import load_config
from sam3_core.data.clips import ClipConfig, ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import DataPrepConfig, PreparedDataset, prepare_dataset
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.model.build import build_detector
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from sam3_core.train.diagnostics import diagnose, frame_diagnostics
from sam3_core.train.loss import LossConfig, build_loss
from sam3_core.train.optim import build_optimizer, build_scheduler

IMAGE_SIZE = 56
MODEL = ModelConfig(image_size=IMAGE_SIZE, vit_pretrain_img_size=IMAGE_SIZE)
TERMS = ("loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice")


@pytest.fixture(scope="module")
def native_size_dataset(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """Two videos whose frames are exactly the model's input size, several objects per frame."""
    videos = SyntheticConfig(
        num_videos=2,
        frames_per_video=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        min_objects=3,
        max_objects=3,
        min_size=10,
        max_size=24,
    )
    store = tmp_path_factory.mktemp("parity-store")
    return prepare_dataset(DataPrepConfig(source="synthetic", synthetic=videos, store=str(store), val_fraction=0.5))


def sam3_batch(dataset: PreparedDataset, tmp_path: Path) -> Any:
    """The first validation frame through sam3's own loader, transforms and collator (the store is a local folder)."""
    from sam3.train.data.coco_json_loaders import COCO_FROM_JSON
    from sam3.train.data.collator import collate_fn_api
    from sam3.train.data.sam3_image_dataset import Sam3ImageDataset
    from sam3.train.transforms.basic_for_api import ComposeAPI, NormalizeAPI, RandomResizeAPI, ToTensorAPI
    from sam3.train.transforms.segmentation import DecodeRle

    reader = FrameReader(dataset.uri, None)
    coco = json.loads(reader.local_path("val_frames_coco.json").read_text())
    first = min(image["id"] for image in coco["images"])
    one_frame = {
        **coco,
        "images": [image for image in coco["images"] if image["id"] == first],
        "annotations": [ann for ann in coco["annotations"] if ann["image_id"] == first],
    }
    ann_file = tmp_path / "one_frame_coco.json"
    ann_file.write_text(json.dumps(one_frame))
    transforms = ComposeAPI(
        [
            DecodeRle(),
            RandomResizeAPI(sizes=IMAGE_SIZE, square=True, consistent_transform=False),
            ToTensorAPI(),
            NormalizeAPI(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )
    sam3_dataset = Sam3ImageDataset(
        img_folder=dataset.uri,
        ann_file=str(ann_file),
        transforms=[transforms],
        max_ann_per_img=100,
        multiplier=1,
        training=True,
        load_segmentation=True,
        use_caching=False,
        coco_json_loader=COCO_FROM_JSON,
    )
    return collate_fn_api([sam3_dataset[0]], dict_key="parity", with_seg_masks=True)["parity"]


def our_batch(dataset: PreparedDataset) -> Any:
    """The same frame as a one-frame clip of ours, every category asked (as sam3's COCO loader does)."""
    reader = FrameReader(dataset.uri, None)
    clips = ClipConfig(frames_per_clip=1, num_negatives=100, max_prompts=100)
    val = ClipDataset(
        reader.dataset("val"), lambda name: np.array(reader.image(name)), clips, IMAGE_SIZE, seed=0, train=False
    )
    return collate_clips([val[0]])


def upstream_loss(num_queries: int) -> torch.nn.Module:
    """sam3's loss exactly as its fine-tuning config (roboflow_v100_full_ft) writes it, masks added as it notes."""
    from sam3.train.loss.loss_fns import Boxes, IABCEMdetr, Masks
    from sam3.train.loss.sam3_loss import Sam3LossWrapper
    from sam3.train.matcher import BinaryHungarianMatcherV2, BinaryOneToManyMatcher

    return Sam3LossWrapper(
        loss_fns_find=[
            Boxes(weight_dict={"loss_bbox": 5.0, "loss_giou": 2.0}),
            IABCEMdetr(
                weak_loss=False,
                weight_dict={"loss_ce": 20.0, "presence_loss": 20.0},
                pos_weight=10.0,
                alpha=0.25,
                gamma=2,
                use_presence=True,
                pos_focal=False,
                pad_n_queries=num_queries,
                pad_scale_pos=1.0,
            ),
            Masks(
                focal_alpha=0.25,
                focal_gamma=2.0,
                weight_dict={"loss_mask": 200.0, "loss_dice": 10.0},
                compute_aux=False,
            ),
        ],
        # one process: the "global" normalisation would all-reduce without a process group
        normalization="local",
        matcher=BinaryHungarianMatcherV2(
            focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2, stable=False
        ),
        o2m_matcher=BinaryOneToManyMatcher(alpha=0.3, threshold=0.4, topk=4),
        o2m_weight=2.0,
        use_o2m_matcher_on_o2m_aux=False,
        # upstream's config also sets scale_by_find_batch_size (core loss x sqrt(prompts per frame));
        # ours does not, so core losses are compared unscaled
    )


@pytest.fixture(scope="module")
def both_paths(
    native_size_dataset: PreparedDataset, tmp_path_factory: pytest.TempPathFactory, torch_single_thread: None
) -> dict[str, Any]:
    """One training forward of the same freshly built weights through each path, and its loss terms."""
    detector = build_detector(MODEL)
    ours = VideoClipDetector(detector).train()
    batch, reference = our_batch(native_size_dataset), sam3_batch(native_size_dataset, tmp_path_factory.mktemp("coco"))
    our_losses = build_loss(LossConfig(), MODEL.num_queries, with_masks=True)(
        ours(batch), [detector.back_convert(t) for t in batch.find_targets]
    )
    their_losses = upstream_loss(MODEL.num_queries)(
        detector(reference), [detector.back_convert(t) for t in reference.find_targets]
    )
    return {"batch": batch, "reference": reference, "ours": our_losses, "theirs": their_losses}


def by_prompt(batch: Any) -> dict[str, tuple[list[list[float]], list[np.ndarray]]]:
    """Prompt text -> (its target boxes, its target masks), independent of the order prompts come in."""
    target = batch.find_targets[0]
    texts = [batch.find_text_batch[i] for i in batch.find_inputs[0].text_ids.tolist()]
    out, start = {}, 0
    for text, count in zip(texts, target.num_boxes.tolist()):
        # sam3's resize leaves each box as [1, 4], ours are [4]; the loss views both as [N, 4]
        boxes = target.boxes[start : start + count].reshape(-1, 4).tolist()
        masks = [m.numpy() for m in target.segments[start : start + count]]
        out[text] = (boxes, masks)
        start += count
    return out


def test_both_paths_feed_the_model_the_same_image(both_paths: dict[str, Any]) -> None:
    assert torch.equal(both_paths["batch"].img_batch, both_paths["reference"].img_batch)


def test_both_paths_give_every_prompt_the_same_target_boxes_and_masks(both_paths: dict[str, Any]) -> None:
    ours, theirs = by_prompt(both_paths["batch"]), by_prompt(both_paths["reference"])
    assert sorted(ours) == sorted(theirs)
    for text in ours:
        # sam3 normalises float32 boxes in a different order of operations: equal to float32 rounding
        np.testing.assert_allclose(ours[text][0], theirs[text][0], rtol=0, atol=1e-6)
        assert all(np.array_equal(a, b) for a, b in zip(ours[text][1], theirs[text][1]))


@pytest.mark.parametrize("term", ["core_loss", *TERMS, *(f"{t}_o2m" for t in TERMS if t != "presence_loss")])
def test_one_frame_clip_loss_terms_equal_sam3s_own_training_path(both_paths: dict[str, Any], term: str) -> None:
    """Same weights, same image: every loss term of ours equals sam3's to 1e-5 (float32 sums in another order)."""
    ours, theirs = both_paths["ours"], both_paths["theirs"]
    assert term in ours and term in theirs
    assert float(ours[term].detach()) == pytest.approx(float(theirs[term].detach()), rel=1e-5, abs=1e-6)


# steps of the overfit run: every object's top-query IoU passed 0.8 at step 70 and stayed >= 0.92 from
# step 110 to 150 (measured); with sam3's own anchor initialisation it was below 0.8 at step 120
OVERFIT_STEPS = 120


@pytest.fixture(scope="module")
def overfit_run(tiny_dataset: PreparedDataset, torch_single_thread: None) -> dict[str, Any]:
    """The tiny preset (56 px) trained OVERFIT_STEPS steps on one 2-frame clip, as the train component would."""
    cfg = load_config(
        "train",
        TrainConfig,
        [
            f"data.uri={tiny_dataset.uri}",
            "model.image_size=56",
            "model.vit_pretrain_img_size=56",
            "optim.lr=2e-3",
            "optim.warmup_steps=10",
            "optim.schedule=constant",
        ],
    )
    reader = FrameReader(tiny_dataset.uri, None)
    load = lambda name: np.array(reader.image(name))  # noqa: E731
    clip = ClipDataset(reader.dataset("train"), load, cfg.data.clips, cfg.model.image_size, seed=0, train=False)[0]
    batch = collate_clips([clip])
    module = VideoClipDetector(build_detector(cfg.model)).train()
    loss_fn = build_loss(cfg.loss, cfg.model.num_queries, with_masks=True)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, OVERFIT_STEPS)
    for _ in range(OVERFIT_STEPS):
        losses = loss_fn(module(batch), [module.detector.back_convert(t) for t in batch.find_targets])
        losses["core_loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    module.eval()
    with torch.no_grad():
        stages = module(batch, with_targets=True)
    per_frame = [
        frame_diagnostics(stage[-1], module.detector.back_convert(target))
        for stage, target in zip(stages.output, batch.find_targets)
    ]
    val = ClipDataset(reader.dataset("val"), load, cfg.data.clips, cfg.model.image_size, seed=0, train=False)
    return {"per_frame": per_frame, "diag": diagnose(module, val, OVERFIT_STEPS, train_dataset=[clip])}


@pytest.mark.integration
def test_overfitting_one_clip_puts_the_highest_scoring_query_on_every_object(overfit_run: dict[str, Any]) -> None:
    ious = [iou for frame in overfit_run["per_frame"] for iou in frame["top_box_iou"]]
    assert len(ious) >= 2
    assert min(ious) >= 0.8, ious


def test_diagnose_reports_every_diag_metric_for_the_training_and_the_validation_clips(
    overfit_run: dict[str, Any],
) -> None:
    names = ("top_box_iou", "matched_box_iou", "matched_is_top", "query_cosine")
    assert set(overfit_run["diag"]) == {f"diag/{split}_{n}" for split in ("train", "val") for n in names}
    assert all(math.isfinite(v) for v in overfit_run["diag"].values())
    assert overfit_run["diag"]["diag/train_top_box_iou"] >= 0.8
