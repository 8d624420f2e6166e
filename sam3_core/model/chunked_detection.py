"""Video detection: the detector on a frame in prompt batches, and a video's frames spread over ranks.

`frame_detector` runs SAM3's detector on one frame for every prompt of a list: the image
backbone once per frame, the text encoder once per prompt batch (when built), `forward_grounding`
per batch of `detection.prompt_batch` prompts, under bf16 autocast on GPU by default. It yields the
raw outputs one batch at a time, so a caller that reduces them as they come (the frame's top-k in
`sam3_core.predict.postprocess`) holds one batch of raw masks ([batch, queries, 288, 288] at
1008 px) at a time: memory is bounded by the batch, not by the vocabulary.

`ChunkedVideoDetector` spreads a video's frames over ranks in chunks of `world_size` consecutive
frames: for the chunk [b, b + W) rank r processes frame b + r into what the caller keeps of it
(post-processed detections, never raw outputs), and the chunk's results are gathered as Python
objects over gloo to the one rank that needs them (or to every rank). Each frame's result depends
on that frame only, so on N processes the results equal those on one process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import nn

from sam3_core import comm
from sam3_core.config_checks import check_bool, check_choice, check_float, check_int
from sam3_core.errors import InputError
from sam3_core.memory import available_memory
from sam3_core.model.config import ModelConfig
from sam3_core.numerics import AMP_MODES, amp_dtype

# detector outputs kept per frame: all a post-processor needs
OUTPUT_KEYS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec")
# copies of a prompt batch's outputs alive at once at the peak (decoder, mask upsampling, post-processing)
OUTPUT_COPIES = 3
T = TypeVar("T")


@dataclass
class DetectionConfig:
    # prompts given to the detector together on one frame: its activations and raw outputs grow
    # with the batch, so memory is bounded by it, not by the number of categories; 0: all at once
    prompt_batch: int = 16
    # "auto": bf16 autocast on GPU, full precision on CPU; "bf16": bf16 autocast anywhere; "off"
    amp: str = "auto"
    # mask NMS among one prompt's detections: suppressed ones get their logit lowered by 1e4
    nms: bool = False
    # detections scoring below this take no part in NMS
    nms_prob_threshold: float = 0.5
    # a detection overlapping a better one by more than this mask IoU is suppressed
    nms_iou_threshold: float = 0.7
    # walk the video from its last frame to its first
    reverse: bool = False

    def __post_init__(self) -> None:
        check_int("detection.prompt_batch", self.prompt_batch, 0)
        check_choice("detection.amp", self.amp, AMP_MODES)
        for name in ("nms", "reverse"):
            check_bool(f"detection.{name}", getattr(self, name))
        check_float("detection.nms_prob_threshold", self.nms_prob_threshold, 0.0, 1.0)
        check_float("detection.nms_iou_threshold", self.nms_iou_threshold, 0.0, 1.0)


def suppress_duplicates(out: dict[str, torch.Tensor], prob_threshold: float, iou_threshold: float) -> None:
    """Mask NMS per prompt, in place: a suppressed detection's logit is lowered by 1e4."""
    from sam3.perflib.nms import nms_masks

    probs = out["pred_logits"].float().squeeze(-1).sigmoid()
    for prompt in range(probs.shape[0]):
        keep = nms_masks(
            pred_probs=probs[prompt],
            pred_masks=out["pred_masks"][prompt],
            prob_threshold=prob_threshold,
            iou_threshold=iou_threshold,
        )
        out["pred_logits"][prompt, :, 0] -= 1e4 * (~keep).to(out["pred_logits"].dtype)


def _batches(count: int, size: int) -> list[tuple[int, int]]:
    step = size if size > 0 else max(count, 1)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def detection_bytes(num_prompts: int, cfg: ModelConfig, prompt_batch: int = 0) -> int:
    """About the peak bytes of one frame's detection of `num_prompts` prompts, `prompt_batch` at a time (0: all).

    Per prompt of a batch: each query's mask (a quarter of the input's resolution, 4x the patch grid),
    its decoder activations (FFN, box and score heads), its attention over the image tokens and its
    text encoding; `OUTPUT_COPIES` of that at the peak. Per prompt of the list: its text encoding,
    which `frame_detector` keeps for the whole video. Measured on the tiny preset (4,000 prompts at
    56 px at once: 1.42 GiB at the peak, 1.33 GiB estimated without the kept text encodings).
    """
    batch = min(num_prompts, prompt_batch) if prompt_batch > 0 else num_prompts
    grid = cfg.image_size // cfg.patch_size
    mask = (4 * grid) ** 2 if cfg.enable_segmentation else 0
    per_query = mask + cfg.ffn_dim + 4 * cfg.d_model + cfg.heads * grid * grid
    text = 8 * cfg.text_context_length * cfg.text_width
    return 4 * (OUTPUT_COPIES * batch * (cfg.num_queries * per_query + text) + num_prompts * text)


def check_prompts_fit(
    num_prompts: int, cfg: ModelConfig, source: str, device: torch.device | None = None, prompt_batch: int = 0
) -> None:
    """Refuse, before any work, prompt lists whose detection cannot fit in memory: every category of a
    dataset is a prompt on every frame, so a vocabulary given to the detector at once (or text encodings
    of 100k phrases) is an out-of-memory at the first frame otherwise."""
    need = detection_bytes(num_prompts, cfg, prompt_batch)
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory()
    if need > free:
        batch = f"{prompt_batch} at a time" if 0 < prompt_batch < num_prompts else "all at once"
        raise InputError(
            source,
            "categories",
            f"{num_prompts} categories are {num_prompts} prompts on every frame ({batch}): with model.num_queries="
            f"{cfg.num_queries} and model.image_size={cfg.image_size} a frame's detection needs about "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free; use a smaller "
            "detection.prompt_batch, fewer categories (a dataset of the phrases the videos use) or a smaller "
            "model.image_size",
        )


def frame_detector(
    model: nn.Module,
    text_batch: list[str],
    image_for: Callable[[int], torch.Tensor],
    cfg: DetectionConfig | None = None,
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """`detect(frame)`: the detector's outputs (`OUTPUT_KEYS`, [prompts, queries, ...]) for every prompt
    of `text_batch` on that frame, yielded one prompt batch at a time, in prompt order."""
    from sam3.model.data_misc import FindStage
    from sam3.model.geometry_encoders import Prompt

    cfg = cfg or DetectionConfig()
    detector = model.detector if hasattr(model, "detector") else model
    device = detector.device
    dtype = amp_dtype(cfg.amp, device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def find_stage(count: int) -> FindStage:
        return FindStage(
            img_ids=torch.zeros(count, dtype=torch.long, device=device),
            text_ids=torch.arange(count, dtype=torch.long, device=device),
            input_boxes=torch.zeros(0, count, 4, device=device),
            input_boxes_mask=torch.ones(count, 0, dtype=torch.bool, device=device),
            input_boxes_label=torch.zeros(0, count, dtype=torch.long, device=device),
            input_points=torch.zeros(0, count, 257, device=device),
            input_points_mask=torch.ones(count, 0, dtype=torch.bool, device=device),
            object_ids=[[] for _ in range(count)],
        )

    with torch.no_grad(), autocast():
        batches = [
            (detector.backbone.forward_text(text_batch[start:end], device=device), find_stage(end - start))
            for start, end in _batches(len(text_batch), cfg.prompt_batch)
        ]

    @torch.no_grad()
    def detect(frame: int) -> Iterator[dict[str, torch.Tensor]]:
        image = image_for(frame).to(device)[None]
        with autocast():
            image_out = {"img_batch_all_stages": image, **detector.backbone.forward_image(image)}
        for text_out, find_input in batches:
            prompt = Prompt(
                box_embeddings=find_input.input_boxes,
                box_mask=find_input.input_boxes_mask,
                box_labels=find_input.input_boxes_label,
            )
            with autocast():
                raw = detector.forward_grounding(
                    backbone_out={**image_out, **text_out},
                    find_input=find_input,
                    find_target=None,
                    geometric_prompt=prompt,
                )
            out = {key: value for key, value in raw.items() if key in OUTPUT_KEYS}
            del raw
            if cfg.nms and "pred_masks" in out:
                suppress_duplicates(out, cfg.nms_prob_threshold, cfg.nms_iou_threshold)
            yield out

    return detect


class ChunkedVideoDetector(Generic[T]):
    """Runs `process(frame) -> result` over a video, its frames spread over ranks in chunks of `world_size`.

    Ranks past the video's end in its last chunk process nothing. A result travels as a Python
    object (pickled, over gloo), so it should be what the caller keeps of a frame (e.g. its
    post-processed detections), not raw outputs.
    """

    def __init__(self, process: Callable[[int], T], reverse: bool = False) -> None:
        self.process, self.reverse = process, reverse
        self.rank, self.world_size = comm.rank(), comm.world_size()

    def _chunks(self, num_frames: int) -> list[int]:
        starts = list(range(0, num_frames, self.world_size))
        return starts[::-1] if self.reverse else starts

    def run(self, num_frames: int, owner: int | None = None) -> Iterator[tuple[int, T]]:
        """`(frame, result)` of every frame, in order (last frame first when reversed), on rank `owner`.

        `owner=None`: on every rank. Every rank must call it (each chunk is one collective); on
        the ranks that are not the owner it yields nothing.
        """
        for begin in self._chunks(num_frames):
            mine = begin + self.rank
            result = self.process(mine) if mine < num_frames else None
            if self.world_size == 1:
                parts: list | None = [result]
            elif owner is None:
                parts = comm.all_gather_object(result)
            else:
                parts = comm.gather_object(result, dst=owner)
            if parts is None:
                continue
            ranks = range(min(self.world_size, num_frames - begin))
            for rank in reversed(ranks) if self.reverse else ranks:
                yield begin + rank, parts[rank]
