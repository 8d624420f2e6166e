"""SAM3's tracker, built from sam3 0.1.4's own classes at any size, and the video model it makes with the detector.

SAM3 runs video as a detector plus a SAM2-style memory tracker (`Sam3TrackerPredictor`): the
tracker reads the detector's vision trunk through a second neck (`sam2_convs`, a copy of the
detector's neck), keeps each object's masks in a memory bank (memory encoder + memory attention
with RoPE) and decodes masks with SAM's prompt encoder and mask decoder.
`Sam3VideoInferenceWithInstanceInteractivity` joins both and associates detections to tracks by
mask IoU with hot-start, keep-alive and re-conditioning heuristics (`VideoInferenceConfig`).
sam3's `model_builder` fixes every size at the official one; this builds the same classes with
the sizes of `ModelConfig` (the detector's) and its `TrackerConfig` (`model.tracker.*`), so the tiny
preset runs SAM3's own video inference on a CPU and the full preset has the official layout.

The video model's state dict is SAM3's checkpoint layout: `detector.*` (the image detector,
its `backbone.vision_backbone.sam2_convs.*` included) and `tracker.*`; `build_sam3_video_model`
loads such a checkpoint strictly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sam3_core.config_checks import check_bool, check_float, check_int
from sam3_core.errors import ConfigError

if TYPE_CHECKING:
    from sam3_core.model.config import ModelConfig

log = logging.getLogger(__name__)

DETECTOR_PREFIX = "detector."
TRACKER_PREFIX = "tracker."
# the tracker's own neck inside the detector (a copy of the detector's neck, trained with the tracker)
TRACKER_NECK_PREFIX = "detector.backbone.vision_backbone.sam2_convs."
# sam3's video model normalises frames with these (model_builder.build_sam3_video_model)
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# sam3's tracker settings that are not sizes (model_builder.build_tracker), fixed as in SAM3
_TRACKER_SETTINGS: dict[str, Any] = {
    "multimask_output_in_sam": True,
    "forward_backbone_per_frame_for_eval": True,
    "trim_past_non_cond_mem_for_eval": False,
    "multimask_output_for_tracking": True,
    "multimask_min_pt_num": 0,
    "multimask_max_pt_num": 1,
    "always_start_from_first_ann_frame": False,
    "non_overlap_masks_for_mem_enc": False,
    "non_overlap_masks_for_output": False,
    "offload_output_to_cpu_for_eval": False,
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    },
    "clear_non_cond_mem_around_input": True,
    "fill_hole_area": 0,
}


# the settings Sam3TrackerBase itself takes (the others belong to Sam3TrackerPredictor)
_BASE_SETTINGS = frozenset(
    {
        "multimask_output_in_sam",
        "forward_backbone_per_frame_for_eval",
        "trim_past_non_cond_mem_for_eval",
        "multimask_output_for_tracking",
        "multimask_min_pt_num",
        "multimask_max_pt_num",
        "non_overlap_masks_for_mem_enc",
        "offload_output_to_cpu_for_eval",
        "sam_mask_decoder_extra_args",
    }
)


@dataclass
class VideoInferenceConfig:
    """SAM3's detection-to-track heuristics, named and defaulted as `build_sam3_video_model` sets them.

    Key `sam3_video.*` of predict. The names are those of sam3's `Sam3VideoBase` arguments.
    """

    # detections scoring above this enter NMS and matching
    score_threshold_detection: float = 0.5
    # mask-IoU NMS among one frame's detections (0: off)
    det_nms_thresh: float = 0.1
    # a detection overlapping a track by this mask IoU is that track's (not a new object)
    assoc_iou_thresh: float = 0.1
    # a track overlapped by no detection at this mask IoU counts as unmatched on the frame
    trk_assoc_iou_thresh: float = 0.5
    # an unmatched detection starts a new track when it scores at least this
    new_det_thresh: float = 0.7
    # hot-start: outputs are held back this many frames, and within that period a new track is
    # removed when it is unmatched on hotstart_unmatch_thresh frames or duplicates an older
    # track on hotstart_dup_thresh frames (0: no hot-start)
    hotstart_delay: int = 15
    hotstart_unmatch_thresh: int = 8
    hotstart_dup_thresh: int = 8
    suppress_unmatched_only_within_hotstart: bool = True
    # keep-alive: +1 per matched frame, -1 per unmatched one, within [min, max]; a track at 0 or
    # below is hidden (when suppress_unmatched_only_within_hotstart is false)
    init_trk_keep_alive: int = 30
    max_trk_keep_alive: int = 30
    min_trk_keep_alive: int = -1
    decrease_trk_keep_alive_for_empty_masklets: bool = False
    # of two tracks overlapping by this mask IoU, the one occluded more recently is hidden (0: off)
    suppress_overlapping_based_on_recent_occlusion_threshold: float = 0.7
    suppress_det_close_to_boundary: bool = False
    # holes and specks up to this area (low-res mask pixels) are filled or removed
    fill_hole_area: int = 16
    # tracks at most, over all ranks (-1: no limit)
    max_num_objects: int = -1
    # re-conditioning: every n-th frame a confident track is re-prompted with its matched detection's mask (0: off)
    recondition_every_nth_frame: int = 16
    # re-prompt as well when a track's box and its detection's box overlap less than this (0: off)
    reconstruction_bbox_iou_thresh: float = 0.0
    reconstruction_bbox_det_score: float = 0.0
    # one-to-one (Hungarian) matching of detections to tracks instead of many-to-one
    o2o_matching_masklets_enable: bool = False
    # masklet confirmation: a new track is shown once matched on this many consecutive frames
    masklet_confirmation_enable: bool = False
    masklet_confirmation_consecutive_det_thresh: int = 3

    def __post_init__(self) -> None:
        for key in (
            "score_threshold_detection",
            "det_nms_thresh",
            "assoc_iou_thresh",
            "trk_assoc_iou_thresh",
            "new_det_thresh",
            "suppress_overlapping_based_on_recent_occlusion_threshold",
            "reconstruction_bbox_iou_thresh",
            "reconstruction_bbox_det_score",
        ):
            check_float(f"sam3_video.{key}", getattr(self, key), 0.0, 1.0)
        check_int("sam3_video.hotstart_delay", self.hotstart_delay, 0)
        for key in ("hotstart_unmatch_thresh", "hotstart_dup_thresh"):
            maximum = self.hotstart_delay if self.hotstart_delay > 0 else None
            check_int(f"sam3_video.{key}", getattr(self, key), 0, maximum)
        for key in ("init_trk_keep_alive", "max_trk_keep_alive", "min_trk_keep_alive"):
            check_int(f"sam3_video.{key}", getattr(self, key))
        check_int("sam3_video.min_trk_keep_alive", self.min_trk_keep_alive, None, self.max_trk_keep_alive)
        check_int("sam3_video.fill_hole_area", self.fill_hole_area, 0)
        check_int("sam3_video.max_num_objects", self.max_num_objects, -1)
        if self.max_num_objects == 0:
            raise ConfigError("sam3_video.max_num_objects=0: track at least one object, or -1 for no limit")
        check_int("sam3_video.recondition_every_nth_frame", self.recondition_every_nth_frame, 0)
        check_int(
            "sam3_video.masklet_confirmation_consecutive_det_thresh",
            self.masklet_confirmation_consecutive_det_thresh,
            1,
        )
        for key in (
            "suppress_unmatched_only_within_hotstart",
            "decrease_trk_keep_alive_for_empty_masklets",
            "suppress_det_close_to_boundary",
            "o2o_matching_masklets_enable",
            "masklet_confirmation_enable",
        ):
            check_bool(f"sam3_video.{key}", getattr(self, key))


def _forked_rng() -> contextlib.AbstractContextManager[Any]:
    """The global RNG as it was, after a seeded construction."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def _memory_encoder(cfg: ModelConfig) -> nn.Module:
    from sam3.model.memory import CXBlock, SimpleFuser, SimpleMaskDownSampler, SimpleMaskEncoder
    from sam3.model.position_encoding import PositionEmbeddingSine

    feature_side = cfg.image_size // cfg.patch_size
    block = CXBlock(dim=cfg.d_model, kernel_size=7, padding=3, layer_scale_init_value=1.0e-06, use_dwconv=True)
    return SimpleMaskEncoder(
        out_dim=cfg.tracker.mem_dim,
        # precompute_resolution stays None: precomputing allocates on "cuda" (see cpu_compat tests)
        position_encoding=PositionEmbeddingSine(
            num_pos_feats=cfg.tracker.mem_dim, normalize=True, scale=None, temperature=10000
        ),
        # masks enter at 16x the feature side and leave at the feature side (sam3: 1152 -> 72)
        mask_downsampler=SimpleMaskDownSampler(
            embed_dim=cfg.d_model,
            kernel_size=3,
            stride=2,
            padding=1,
            interpol_size=[feature_side * 16, feature_side * 16],
        ),
        fuser=SimpleFuser(layer=block, num_layers=cfg.tracker.fuser_layers),
        in_dim=cfg.d_model,
    )


def _memory_attention(cfg: ModelConfig) -> nn.Module:
    from sam3.model.decoder import TransformerDecoderLayerv2, TransformerEncoderCrossAttention
    from sam3.model.model_misc import TransformerWrapper
    from sam3.sam.transformer import RoPEAttention

    tracker = cfg.tracker
    feature_side = cfg.image_size // cfg.patch_size
    rope = {
        "embedding_dim": cfg.d_model,
        "num_heads": tracker.memory_heads,
        "downsample_rate": 1,
        "dropout": tracker.dropout,
        "rope_theta": 10000.0,
        "feat_sizes": [feature_side, feature_side],
        "use_fa3": False,
        "use_rope_real": False,
    }
    layer = TransformerDecoderLayerv2(
        cross_attention_first=False,
        activation="relu",
        dim_feedforward=tracker.memory_ffn_dim,
        dropout=tracker.dropout,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=RoPEAttention(**rope),
        d_model=cfg.d_model,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
        cross_attention=RoPEAttention(**rope, kv_in_dim=tracker.mem_dim, rope_k_repeat=True),
    )
    encoder = TransformerEncoderCrossAttention(
        remove_cross_attention_layers=[],
        batch_first=True,
        d_model=cfg.d_model,
        frozen=False,
        pos_enc_at_input=True,
        layer=layer,
        num_layers=tracker.memory_layers,
        use_act_checkpoint=False,
    )
    return TransformerWrapper(encoder=encoder, decoder=None, d_model=cfg.d_model)


def build_tracker(cfg: ModelConfig, *, predictor: bool = True) -> nn.Module:
    """SAM3's tracker at the sizes of `cfg` (`model.tracker.*` and the detector's side, stride and width).

    `predictor=True`: `Sam3TrackerPredictor`, the class SAM3's video model runs (inference state,
    prompts, propagation). `predictor=False`: its base `Sam3TrackerBase` (same parameters and
    state-dict keys), for training. Construction is seeded by `cfg.init_seed`.

    `Sam3TrackerPredictor.__init__` enters a CUDA bf16 autocast and never leaves it, which would
    turn on bf16 for everything the process runs later on a GPU; it is left here, and
    `inference_context` enters the same autocast around video inference only.
    """
    from sam3.model.sam3_tracker_base import Sam3TrackerBase
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    from sam3_core.model import cpu_compat

    cpu_compat.apply()
    tracker = cfg.tracker
    sizes: dict[str, Any] = {
        "image_size": cfg.image_size,
        "backbone_stride": cfg.patch_size,
        "num_maskmem": tracker.num_maskmem,
        "max_cond_frames_in_attn": tracker.max_cond_frames_in_attn,
        "max_obj_ptrs_in_encoder": tracker.max_obj_ptrs_in_encoder,
        "use_memory_selection": tracker.memory_selection,
        "mf_threshold": tracker.memory_selection_threshold,
    }
    base_settings = {k: v for k, v in _TRACKER_SETTINGS.items() if k in _BASE_SETTINGS}
    with _forked_rng():
        torch.manual_seed(cfg.init_seed)
        parts = {"backbone": None, "transformer": _memory_attention(cfg), "maskmem_backbone": _memory_encoder(cfg)}
        if predictor:
            model = Sam3TrackerPredictor(**parts, **sizes, **_TRACKER_SETTINGS)
            model.bf16_context.__exit__(None, None, None)
        else:
            model = Sam3TrackerBase(**parts, **sizes, **base_settings)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built SAM3 tracker preset=%s (%.2fM parameters)", cfg.preset, n_params / 1e6)
    return model


def video_detector(detector: nn.Module) -> nn.Module:
    """The image detector (`Sam3Image` from `build_detector`) as the video model's `Sam3ImageOnVideoMultiGPU`.

    The same modules, plus the tracker's neck: `sam2_convs`, which sam3 creates as a copy of the
    detector's neck (`Sam3DualViTDetNeck(add_sam2_neck=True)`). Frames are spread over the ranks
    of `RANK` / `WORLD_SIZE`, as sam3 reads them.
    """
    from sam3.model.sam3_image import Sam3ImageOnVideoMultiGPU

    neck = detector.backbone.vision_backbone
    if neck.sam2_convs is None:
        neck.sam2_convs = copy.deepcopy(neck.convs)
    return Sam3ImageOnVideoMultiGPU(
        backbone=detector.backbone,
        transformer=detector.transformer,
        input_geometry_encoder=detector.geometry_encoder,
        segmentation_head=detector.segmentation_head,
        num_feature_levels=detector.num_feature_levels,
        dot_prod_scoring=detector.dot_prod_scoring,
        use_dot_prod_scoring=True,
        supervise_joint_box_scores=True,
        matcher=None,
    )


def build_video_model(cfg: ModelConfig, inference: VideoInferenceConfig | None = None) -> nn.Module:
    """SAM3's video model (`Sam3VideoInferenceWithInstanceInteractivity`): detector + tracker, weights initialised.

    `inference`: the detection-to-track heuristics (SAM3's defaults when None). The state dict
    has SAM3's checkpoint layout (`detector.*`, `tracker.*`); sam3 reads `RANK` / `WORLD_SIZE`
    when it is built.
    """
    from sam3.model.sam3_video_inference import Sam3VideoInferenceWithInstanceInteractivity

    from sam3_core.model.build import build_detector

    if not cfg.enable_segmentation:
        raise ConfigError("model.enable_segmentation=false: SAM3's video model tracks masks; it needs the mask head")
    heuristics = asdict(inference or VideoInferenceConfig())
    model = Sam3VideoInferenceWithInstanceInteractivity(
        detector=video_detector(build_detector(cfg)),
        tracker=build_tracker(cfg),
        image_size=cfg.image_size,
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
        compile_model=False,
        **heuristics,
    )
    return model.eval()


def tracker_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The `tracker.*` tensors of a state dict (a checkpoint's `model` or a flat SAM3 checkpoint)."""
    return {k: v for k, v in state.items() if k.startswith(TRACKER_PREFIX) and isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """Where SAM3's video model runs: bf16 autocast on `device` (as SAM3 runs it), and on a CPU its CUDA calls kept on the CPU."""
    from sam3_core.model import cpu_compat

    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(cpu_compat.cuda_calls_on_cpu())
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
        stack.enter_context(torch.inference_mode())
        yield


def load_video_model_weights(model: nn.Module, uri: str) -> tuple[Any, list[str]]:
    """Weights of a checkpoint into SAM3's video model: its `detector.*` (LoRA adapters merged) and its `tracker.*`.

    Any checkpoint of ours or in SAM3's layout: a training checkpoint fills the detector, an
    exported or official one the tracker as well. Returns the detector's `LoadReport` (missing
    keys include the tracker's neck when the checkpoint has none) and the tracker keys the
    checkpoint lacks (those keep their initial weights).
    """
    from sam3_core.errors import InputError
    from sam3_core.model.checkpoint import load_checkpoint, load_model_weights
    from sam3_core.model.video_detector import VideoClipDetector

    holder = VideoClipDetector(model.detector)
    report = load_model_weights(holder, uri)
    model.detector = holder.detector  # a LoRA merge replaces the module
    checkpoint = load_checkpoint(uri, mmap=True)
    state = tracker_state_dict(checkpoint.get("model", checkpoint))
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            raise InputError(uri, key, "is not a parameter of SAM3's tracker at this preset; check model.tracker")
        if own[key].shape != value.shape:
            raise InputError(
                uri,
                key,
                f"shape {tuple(value.shape)} does not fit the tracker's {tuple(own[key].shape)}; check model.tracker",
            )
    model.load_state_dict(state, strict=False)
    missing = sorted(key for key in own if key.startswith(TRACKER_PREFIX) and key not in state)
    if missing:
        log.warning(
            "%s holds no weights for %d of the tracker's %d tensors (e.g. %s): they keep their initial values; "
            "export it with a base checkpoint (sam3pipe component export) to track with a trained tracker",
            uri,
            len(missing),
            sum(key.startswith(TRACKER_PREFIX) for key in own),
            missing[0],
        )
    else:
        log.info("loaded %d tracker tensors from %s", len(state), uri)
    return report, missing
