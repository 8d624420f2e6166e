"""Multi-process video detection: a video's frames spread over ranks in chunks of `world_size`.

For the chunk [b, b + W) rank r runs the detector on frame b + r; the outputs are all-gathered
(asynchronously where the backend allows) into a per-frame buffer, so every rank can read every
frame. While frame f of the current chunk is consumed, the next chunk (in the direction of
travel, forward or reverse) is already being computed, and the chunk before is dropped, so at
most two chunks are held. On N processes the per-frame outputs equal those on one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sam3_core import comm
from sam3_core.config_checks import check_bool, check_float
from sam3_core.errors import InputError
from sam3_core.memory import available_memory
from sam3_core.model.config import ModelConfig

# detector outputs kept per frame: all a post-processor needs
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")
# copies of a frame's outputs alive at once at the peak (decoder, mask upsampling, post-processing)
OUTPUT_COPIES = 3


@dataclass
class DetectionConfig:
    # overlap the all-gather of a chunk with the next chunk's compute (same outputs either way)
    async_gather: bool = True
    # mask NMS among one prompt's detections: suppressed ones get their logit lowered by 1e4
    nms: bool = False
    # detections scoring below this take no part in NMS
    nms_prob_threshold: float = 0.5
    # a detection overlapping a better one by more than this mask IoU is suppressed
    nms_iou_threshold: float = 0.7
    # walk the video from its last frame to its first
    reverse: bool = False

    def __post_init__(self) -> None:
        for name in ("async_gather", "nms", "reverse"):
            check_bool(f"detection.{name}", getattr(self, name))
        check_float("detection.nms_prob_threshold", self.nms_prob_threshold, 0.0, 1.0)
        check_float("detection.nms_iou_threshold", self.nms_iou_threshold, 0.0, 1.0)


class _Pending:
    """A gathered tensor list whose collective may still be in flight."""

    def __init__(self, tensors: list[torch.Tensor], handle: Any) -> None:
        self.tensors, self.handle = tensors, handle

    def get(self, rank: int) -> torch.Tensor:
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        return self.tensors[rank]


class ChunkedVideoDetector:
    """Runs `detect_frame(frame_index) -> {key: tensor}` over a video, chunked across ranks."""

    def __init__(self, detect_frame: Callable[[int], dict[str, torch.Tensor]], cfg: DetectionConfig) -> None:
        self.detect_frame = detect_frame
        self.cfg = cfg
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self._buffer: dict[int, dict[str, tuple[_Pending, int]]] = {}

    def _chunk_start(self, frame: int) -> int:
        return frame - frame % self.world_size

    def _gather(self, x: torch.Tensor) -> _Pending:
        if self.world_size == 1:
            return _Pending([x], None)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        handle = dist.all_gather(out, x, async_op=self.cfg.async_gather)
        return _Pending(out, handle)

    def _suppress_duplicates(self, out: dict[str, torch.Tensor]) -> None:
        from sam3.perflib.nms import nms_masks

        probs = out["pred_logits"].squeeze(-1).sigmoid()
        for prompt in range(probs.shape[0]):
            keep = nms_masks(
                pred_probs=probs[prompt],
                pred_masks=out["pred_masks"][prompt],
                prob_threshold=self.cfg.nms_prob_threshold,
                iou_threshold=self.cfg.nms_iou_threshold,
            )
            out["pred_logits"][prompt, :, 0] -= 1e4 * (~keep).float()

    def _build_chunk(self, begin: int, num_frames: int) -> None:
        end = min(begin + self.world_size, num_frames)
        # ranks past the video's end recompute its last frame so every rank joins the collective
        mine = min(begin + self.rank, end - 1)
        out = {k: v for k, v in self.detect_frame(mine).items() if k in OUTPUT_KEYS}
        if self.cfg.nms and "pred_masks" in out:
            self._suppress_duplicates(out)
        gathered = {k: self._gather(v) for k, v in out.items()}
        for rank in range(self.world_size):
            if begin + rank < num_frames:
                self._buffer[begin + rank] = {k: (p, rank) for k, p in gathered.items()}

    def frame_outputs(self, frame: int, num_frames: int) -> dict[str, torch.Tensor]:
        """Outputs of `frame`; computes its chunk if needed and the next chunk ahead of time."""
        begin = self._chunk_start(frame)
        if frame not in self._buffer:
            self._build_chunk(begin, num_frames)
        out = {k: pending.get(rank) for k, (pending, rank) in self._buffer[frame].items()}
        step = -self.world_size if self.cfg.reverse else self.world_size
        for stale in range(begin - step, begin - step + self.world_size):
            self._buffer.pop(stale, None)
        upcoming = begin + step
        if 0 <= upcoming < num_frames and upcoming not in self._buffer:
            self._build_chunk(upcoming, num_frames)
        return out

    def run(self, num_frames: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Every frame's outputs, in order (reversed when configured), on every rank."""
        order = range(num_frames - 1, -1, -1) if self.cfg.reverse else range(num_frames)
        self._buffer.clear()
        for frame in order:
            yield frame, self.frame_outputs(frame, num_frames)
        self._buffer.clear()

    @property
    def buffered_frames(self) -> list[int]:
        return sorted(self._buffer)


def detection_bytes(num_prompts: int, cfg: ModelConfig) -> int:
    """About the peak bytes of one frame's detection with `num_prompts` prompts at once.

    Per prompt: each query's mask (a quarter of the input's resolution, 4x the patch grid), its decoder
    activations (FFN, box and score heads) and its attention over the image tokens, plus the prompt's
    text encoding; `OUTPUT_COPIES` of that at the peak. Measured on the tiny preset (4,000 prompts at
    56 px: 1.42 GiB at the peak, 1.33 GiB estimated).
    """
    grid = cfg.image_size // cfg.patch_size
    mask = (4 * grid) ** 2 if cfg.enable_segmentation else 0
    per_query = mask + cfg.ffn_dim + 4 * cfg.d_model + cfg.heads * grid * grid
    per_prompt = cfg.num_queries * per_query + 8 * cfg.text_context_length * cfg.text_width
    return OUTPUT_COPIES * 4 * num_prompts * per_prompt


def check_prompts_fit(num_prompts: int, cfg: ModelConfig, source: str, device: torch.device | None = None) -> None:
    """Refuse, before any work, prompt lists whose detection cannot fit in memory: every category of a
    dataset is a prompt on every frame, so a vocabulary of 100k phrases is an out-of-memory at the first
    frame otherwise."""
    need = detection_bytes(num_prompts, cfg)
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory()
    if need > free:
        raise InputError(
            source,
            "categories",
            f"{num_prompts} categories are {num_prompts} prompts on every frame: with model.num_queries="
            f"{cfg.num_queries} and model.image_size={cfg.image_size} a frame's detection needs about "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free; use fewer categories (a dataset "
            "of the phrases the videos use) or a smaller model.image_size",
        )


def frame_detector(
    model: nn.Module, text_batch: list[str], image_for: Callable[[int], torch.Tensor]
) -> Callable[[int], dict[str, torch.Tensor]]:
    """`detect_frame` for a SAM3 detector: every prompt of `text_batch` on one frame, text encoded once."""
    from sam3.model.data_misc import FindStage
    from sam3.model.geometry_encoders import Prompt

    detector = model.detector if hasattr(model, "detector") else model
    device = detector.device
    num_prompts = len(text_batch)
    with torch.no_grad():
        text_out = detector.backbone.forward_text(text_batch, device=device)
    find_input = FindStage(
        img_ids=torch.zeros(num_prompts, dtype=torch.long, device=device),
        text_ids=torch.arange(num_prompts, dtype=torch.long, device=device),
        input_boxes=torch.zeros(0, num_prompts, 4, device=device),
        input_boxes_mask=torch.ones(num_prompts, 0, dtype=torch.bool, device=device),
        input_boxes_label=torch.zeros(0, num_prompts, dtype=torch.long, device=device),
        input_points=torch.zeros(0, num_prompts, 257, device=device),
        input_points_mask=torch.ones(num_prompts, 0, dtype=torch.bool, device=device),
        object_ids=[[] for _ in range(num_prompts)],
    )

    @torch.no_grad()
    def detect(frame: int) -> dict[str, torch.Tensor]:
        image = image_for(frame).to(device)[None]
        backbone_out = {"img_batch_all_stages": image, **detector.backbone.forward_image(image), **text_out}
        prompt = Prompt(
            box_embeddings=find_input.input_boxes,
            box_mask=find_input.input_boxes_mask,
            box_labels=find_input.input_boxes_label,
        )
        return detector.forward_grounding(
            backbone_out=backbone_out, find_input=find_input, find_target=None, geometric_prompt=prompt
        )

    return detect
