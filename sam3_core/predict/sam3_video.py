"""inference=sam3_video: masklets from SAM3's own video inference (detector + tracker), frames streamed.

Every video is run as SAM3's own evaluation runs it (`Sam3VideoInference.forward`): for each
category, its name is the text prompt on frame 0 and the prompt is propagated forward through
the video by sam3's `Sam3VideoInferenceWithInstanceInteractivity` (detection, mask-IoU
association, hot-start, keep-alive, re-conditioning: `sam3_video.heuristics.*`, SAM3's defaults).
An object's masklet is its output mask on every frame it is shown, its score the detection score
it started with. Masklets go out in the YTVIS results format, and each frame's masks as COCO
frame results, through the same dumper and evaluation as `inference=linked`.

sam3's own session (`Sam3VideoPredictor`) loads every frame of a video before it starts and keeps,
until the session ends, every frame's tracker memories, its output masks at video resolution and
per-frame bookkeeping that is deep-copied on every frame: memory and time grow with the video
(upstream issues #408, #481). Here frames are decoded when the model asks for them (the last few
are kept), and after each output frame `trim_state` drops what sam3's forward inference can no
longer read. Memory then depends on the objects tracked, not on the number of frames, and the
masklets equal those of sam3's session on the same weights and video (tests pin both).

Ranks: `parallel=videos` gives each rank whole videos (video i on rank i mod world size);
`parallel=frames` runs sam3's own multi-GPU inference, every rank on every video: frames are
detected round-robin over the ranks and the tracks are spread over them (results on rank 0).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pycocotools.mask as mask_utils
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from sam3_core import comm
from sam3_core.config_checks import check_choice
from sam3_core.data.ytvis import Video
from sam3_core.errors import InputError
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker import (
    IMAGE_MEAN,
    IMAGE_STD,
    VideoInferenceConfig,
    build_video_model,
    inference_context,
    load_video_model_weights,
)
from sam3_core.predict.postprocess import FrameDetections, encode_mask, rle_box_xywh, rle_box_xyxy

log = logging.getLogger(__name__)

PARALLEL_MODES = ("videos", "frames")
# text batch of a fresh session: the prompt's slot, then sam3's visual-prompt slot
_TEXT_PLACEHOLDER = "<text placeholder>"
_VISUAL = "visual"
# sam3's historical widths of an empty box / point prompt entry
_BOX_WIDTH, _POINT_WIDTH = 258, 257


@dataclass
class Sam3VideoConfig:
    """Key `sam3_video`: how `inference=sam3_video` runs SAM3's video model."""

    # "videos": each rank runs whole videos; "frames": sam3's multi-GPU inference (frames and tracks over ranks)
    parallel: str = "videos"
    # SAM3's detection-to-track heuristics (sam3_core.model.tracker.VideoInferenceConfig)
    heuristics: VideoInferenceConfig = field(default_factory=VideoInferenceConfig)

    def __post_init__(self) -> None:
        check_choice("sam3_video.parallel", self.parallel, PARALLEL_MODES)


def frame_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """A frame as sam3's video loader makes it: resized by torchvision, float16, normalised in float16."""
    resized = TF.to_tensor(TF.resize(image.convert("RGB"), size=(image_size, image_size))).to(torch.float16)
    resized -= torch.tensor(IMAGE_MEAN, dtype=torch.float16)[:, None, None]
    resized /= torch.tensor(IMAGE_STD, dtype=torch.float16)[:, None, None]
    return resized


class StreamedFrames(Sequence[torch.Tensor]):
    """A video's frames as the model's image batch, each decoded when first asked for; the last `keep` are cached."""

    def __init__(self, load: Callable[[int], Image.Image], length: int, image_size: int, keep: int = 4) -> None:
        self._load, self._length, self._image_size, self._keep = load, length, image_size, keep
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"frame {index} of a {self._length}-frame video")
        if index not in self._cache:
            self._cache[index] = frame_tensor(self._load(index), self._image_size)
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(index)
        return self._cache[index]


class _FindStages(Sequence[Any]):
    """The per-frame find inputs of a session, made when asked for.

    sam3 holds one `FindStage` per frame and only ever writes their text ids, all to the same
    value; here every stage shares one text-id tensor, so the writes land on all frames.
    """

    def __init__(self, length: int, device: torch.device) -> None:
        self._length, self._device = length, device
        self._text_ids = torch.zeros(1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        from sam3.model.data_misc import FindStage, convert_my_tensors
        from sam3.model.utils.misc import copy_data_to_device

        if not 0 <= int(index) < self._length:
            raise IndexError(f"frame {index} of a {self._length}-frame video")
        stage = convert_my_tensors(
            FindStage(
                img_ids=[int(index)],
                text_ids=[0],
                input_boxes=[torch.zeros(_BOX_WIDTH)],
                input_boxes_mask=[torch.empty(0, dtype=torch.bool)],
                input_boxes_label=[torch.empty(0, dtype=torch.long)],
                input_points=[torch.empty(0, _POINT_WIDTH)],
                input_points_mask=[torch.empty(0)],
                object_ids=[],
            )
        )
        stage = copy_data_to_device(stage, self._device)
        stage.text_ids = self._text_ids
        return stage


def streaming_state(model: Any, frames: Sequence[torch.Tensor], height: int, width: int) -> dict[str, Any]:
    """A session state like sam3's `init_state`, over frames read on demand instead of a loaded video."""
    from sam3.model.data_misc import BatchedDatapoint
    from sam3.model.geometry_encoders import Prompt

    device = model.device
    num_frames = len(frames)
    batch = BatchedDatapoint(
        img_batch=frames,
        find_text_batch=[_TEXT_PLACEHOLDER, _VISUAL],
        find_inputs=_FindStages(num_frames, device),
        find_targets=[None] * num_frames,
        find_metadatas=[None] * num_frames,
    )
    empty_prompt = Prompt(
        box_embeddings=torch.zeros(0, 1, 4, device=device),
        box_mask=torch.zeros(1, 0, device=device, dtype=torch.bool),
        box_labels=torch.zeros(0, 1, device=device, dtype=torch.long),
        point_embeddings=torch.zeros(0, 1, 2, device=device),
        point_mask=torch.zeros(1, 0, device=device, dtype=torch.bool),
        point_labels=torch.zeros(0, 1, device=device, dtype=torch.long),
    )
    return {
        "image_size": model.image_size,
        "num_frames": num_frames,
        "orig_height": height,
        "orig_width": width,
        "constants": {"empty_geometric_prompt": empty_prompt},
        "input_batch": batch,
        "previous_stages_out": [None] * num_frames,
        "text_prompt": None,
        "per_frame_raw_point_input": [None] * num_frames,
        "per_frame_raw_box_input": [None] * num_frames,
        "per_frame_visual_prompt": [None] * num_frames,
        "per_frame_geometric_prompt": [None] * num_frames,
        "per_frame_cur_step": [0] * num_frames,
        "visual_prompt_embed": None,
        "visual_prompt_mask": None,
        "tracker_inference_states": [],
        "tracker_metadata": {},
        "feature_cache": {},
        "cached_frame_outputs": {},
        "action_history": [],
        "is_image_only": False,
    }


def _most_recent(frames: Sequence[int], count: int) -> set[int]:
    return set(sorted(frames)[-count:]) if count > 0 else set()


def _trim_tracker_state(tracker: Any, state: dict[str, Any], frame: int, horizon: int) -> None:
    """Drop the frames of one tracker state that forward tracking past `frame` never reads again.

    Read again are: memories and object pointers of the frames within `horizon`; with memory
    selection, the most recent frames whose score passes the selection threshold (a newer one
    pushes the oldest out for good); the conditioning frames closest to the next frames, which
    are the most recent ones.
    """
    outputs = state["output_dict"]
    non_cond = outputs["non_cond_frame_outputs"]
    keep = {i for i in non_cond if i > horizon}
    if tracker.use_memory_selection:
        selectable = [
            i
            for i, out in non_cond.items()
            if i <= frame and "eff_iou_score" in out and bool(out["eff_iou_score"] > tracker.mf_threshold)
        ]
        keep |= _most_recent(selectable, tracker.max_obj_ptrs_in_encoder)
    dropped_non_cond = [i for i in non_cond if i not in keep]

    cond = outputs["cond_frame_outputs"]
    keep_cond = {i for i in cond if i > horizon} | _most_recent(
        [i for i in cond if i <= frame], tracker.max_cond_frames_in_attn
    )
    if tracker.keep_first_cond_frame and cond:
        keep_cond.add(min(cond))
    dropped_cond = [i for i in cond if i not in keep_cond]

    for i in dropped_non_cond:
        del non_cond[i]
        state["consolidated_frame_inds"]["non_cond_frame_outputs"].discard(i)
        for per_object in state["output_dict_per_obj"].values():
            per_object["non_cond_frame_outputs"].pop(i, None)
    for i in dropped_cond:
        del cond[i]
        state["consolidated_frame_inds"]["cond_frame_outputs"].discard(i)
        for per_object in state["output_dict_per_obj"].values():
            per_object["cond_frame_outputs"].pop(i, None)
        for inputs in (state["point_inputs_per_obj"], state["mask_inputs_per_obj"]):
            for per_frame in inputs.values():
                per_frame.pop(i, None)
    for i in [i for i in state["frames_already_tracked"] if i < frame]:
        del state["frames_already_tracked"][i]


def trim_state(model: Any, state: dict[str, Any], frame: int) -> None:
    """After `frame` is output by a forward propagation, drop what sam3's inference can no longer read.

    Tracker states keep their recent and still selectable frames (`_trim_tracker_state`); the
    per-frame scores and suppressed ids of past frames, the cached output masks of output frames
    go; the hot-start frame lists keep the entries their thresholds count (only their length is
    compared). The frames held back by hot-start are newer than `frame`, so nothing they need goes.
    """
    tracker = model.tracker
    horizon = frame - tracker.memory_temporal_stride_for_eval * max(
        tracker.num_maskmem, tracker.max_obj_ptrs_in_encoder
    )
    for tracker_state in state["tracker_inference_states"]:
        _trim_tracker_state(tracker, tracker_state, frame, horizon)
    cached = state["cached_frame_outputs"]
    for i in [i for i in cached if i <= frame]:
        del cached[i]
    metadata = state["tracker_metadata"]
    scores = metadata.get("obj_id_to_tracker_score_frame_wise", {})
    for i in [i for i in scores if i <= frame]:
        del scores[i]
    rank0 = metadata.get("rank0_metadata")
    if rank0 is not None:
        suppressed = rank0["suppressed_obj_ids"]
        for i in [i for i in suppressed if i <= frame]:
            del suppressed[i]
        for lists, kept in (
            (rank0["unmatched_frame_inds"], model.hotstart_unmatch_thresh),
            (rank0["overlap_pair_to_frame_inds"], model.hotstart_dup_thresh),
        ):
            for frames in lists.values():
                del frames[max(kept, 1) :]


@dataclass
class Masklet:
    """One object of one prompt: its score and its mask (RLE) on every frame it is shown."""

    score: float
    rles: dict[int, dict] = field(default_factory=dict)


def track_prompt(
    model: Any, frames: Sequence[torch.Tensor], height: int, width: int, prompt: str
) -> Iterator[tuple[int, Any]]:
    """sam3's outputs for every frame, in order, for `prompt` given on frame 0 (None on ranks other than 0).

    The generator's return value is the session's object scores (rank 0).
    """
    state = streaming_state(model, frames, height, width)
    model.add_prompt(state, frame_idx=0, text_str=prompt)
    for frame, outputs in model.propagate_in_video(
        state, start_frame_idx=0, max_frame_num_to_track=len(frames), reverse=False
    ):
        trim_state(model, state, frame)
        yield frame, outputs
    return dict(state["tracker_metadata"].get("obj_id_to_score", {}))


def prompt_masklets(
    model: Any, frames: Sequence[torch.Tensor], height: int, width: int, prompt: str
) -> dict[int, Masklet] | None:
    """Object id -> masklet for one prompt, as sam3's `forward` collects them (None on ranks other than 0).

    An object gets a masklet when it is output on at least one frame; its score is the one
    sam3 keeps for it (the detection that started it).
    """
    rles: dict[int, dict[int, dict]] = {}
    stream = track_prompt(model, frames, height, width, prompt)
    while True:
        try:
            frame, outputs = next(stream)
        except StopIteration as stop:
            scores = stop.value
            break
        if outputs is not None:
            for obj_id, mask in zip(outputs["out_obj_ids"].tolist(), outputs["out_binary_masks"]):
                rles.setdefault(int(obj_id), {})[frame] = encode_mask(torch.from_numpy(mask))
    if model.rank != 0:
        return None
    return {obj_id: Masklet(float(scores[obj_id]), by_frame) for obj_id, by_frame in sorted(rles.items())}


def ytvis_results(masklets: Sequence[Masklet], video_id: int, category_id: int, length: int) -> list[dict]:
    """YTVIS result entries (null where an object is not shown), as `inference=linked` writes them."""
    results = []
    for masklet in masklets:
        segmentations: list[dict | None] = [masklet.rles.get(t) for t in range(length)]
        bboxes = [None if rle is None else rle_box_xywh(rle) for rle in segmentations]
        areas = [None if rle is None else float(mask_utils.area(rle)) for rle in segmentations]
        results.append(
            {
                "video_id": video_id,
                "category_id": category_id,
                "score": masklet.score,
                "bboxes": bboxes,
                "segmentations": segmentations,
                "areas": areas,
            }
        )
    return results


def masklet_frames(
    masklets: Sequence[tuple[int, Masklet]], image_ids: Sequence[int], height: int, width: int
) -> list[FrameDetections]:
    """Every frame's shown masks as detections (category, masklet score), best first, for the COCO files."""
    frames = []
    for t, image_id in enumerate(image_ids):
        shown = sorted(
            ((category_id, m.score, m.rles[t]) for category_id, m in masklets if t in m.rles),
            key=lambda item: -item[1],
        )
        frames.append(
            FrameDetections(
                image_id=image_id,
                height=height,
                width=width,
                scores=[score for _, score, _ in shown],
                category_ids=[category_id for category_id, _, _ in shown],
                boxes_xyxy=[rle_box_xyxy(rle) for _, _, rle in shown],
                rles=[rle for _, _, rle in shown],
                areas=[int(mask_utils.area(rle)) for _, _, rle in shown],
            )
        )
    return frames


@dataclass
class VideoPrediction:
    """One video's predictions on the rank that holds them."""

    frames: list[FrameDetections]
    masklets: list[dict]


class Sam3VideoRunner:
    """SAM3's video model with a checkpoint's weights, predicting videos one at a time."""

    def __init__(
        self, model_cfg: ModelConfig, cfg: Sam3VideoConfig, checkpoint: str, device: torch.device, uri: str = ""
    ) -> None:
        """`checkpoint`: a local copy of the weights; `uri`: where they came from, named in errors."""
        self.cfg = cfg
        self.device = device
        self.model = build_video_model(model_cfg, cfg.heuristics)
        try:
            load_video_model_weights(self.model, checkpoint)
        except InputError as exc:
            if not uri:
                raise
            raise InputError(uri, exc.field, exc.message.replace(checkpoint, uri)) from exc
        self.model.to(device).eval()
        if cfg.parallel == "videos":
            # as sam3's own evaluation does: each process runs its videos alone
            self.model.rank = self.model.detector.rank = 0
            self.model.world_size = self.model.detector.world_size = 1
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self.image_size = model_cfg.image_size

    def runs(self, index: int) -> bool:
        """Whether this rank takes part in video `index`."""
        return self.cfg.parallel == "frames" or index % self.world_size == self.rank

    def predict(
        self,
        index: int,
        video: Video,
        image: Callable[[str], Image.Image],
        prompts: Sequence[str],
        category_ids: Sequence[int],
        image_ids: Mapping[tuple[int, int], int],
    ) -> VideoPrediction | None:
        """Video `index`'s predictions (category i prompted by `prompts[i]`) on the rank that holds them, else None.

        `image(file_name)`: a frame of the dataset; `image_ids[(video id, frame)]`: its COCO image id.
        """
        if not self.runs(index):
            return None
        frames = StreamedFrames(
            lambda t: image(video.file_names[t]), video.length, self.image_size, self.world_size + 3
        )
        found: list[tuple[int, Masklet]] = []
        masklets: list[dict] = []
        with inference_context(self.device):
            for prompt, category_id in zip(prompts, category_ids):
                by_object = prompt_masklets(self.model, frames, video.height, video.width, prompt)
                if by_object is not None:
                    found.extend((category_id, m) for m in by_object.values())
                    masklets.extend(ytvis_results(list(by_object.values()), video.id, category_id, video.length))
        if self.model.rank != 0:
            return None
        ids = [image_ids[(video.id, t)] for t in range(video.length)]
        return VideoPrediction(masklet_frames(found, ids, video.height, video.width), masklets)
