"""Multi-frame training forward for the SAM3 detector.

`Sam3Image.forward` asserts a single frame. A clip batch from `collate_clips` has one find stage
per frame; this module runs the image backbone once on all B*T frames, the text encoder once on
all prompts, then `forward_grounding` per frame, returning a `SAM3Output` with one stage per frame
that sam3's loss wrapper consumes with one target per stage.

The detector is held as `self.detector`, so the state dict uses the official checkpoint's
`detector.*` key layout.
"""

from __future__ import annotations

from torch import nn


class VideoClipDetector(nn.Module):
    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, batch, with_targets: bool | None = None):
        """One stage per frame. Targets (and Hungarian matching) default to training mode only;
        `with_targets=True` in eval mode gives a validation loss without dropout."""
        from sam3.model.geometry_encoders import Prompt
        from sam3.model.model_misc import SAM3Output

        detector = self.detector
        backbone_out = {"img_batch_all_stages": batch.img_batch}
        backbone_out.update(detector.backbone.forward_image(batch.img_batch))
        backbone_out.update(detector.backbone.forward_text(batch.find_text_batch, device=detector.device))
        stages = SAM3Output(iter_mode=SAM3Output.IterMode.LAST_STEP_PER_STAGE)
        with_targets = self.training if with_targets is None else with_targets
        targets = batch.find_targets if with_targets else [None] * len(batch.find_inputs)
        for find_input, find_target in zip(batch.find_inputs, targets):
            prompt = Prompt(
                box_embeddings=find_input.input_boxes,
                box_mask=find_input.input_boxes_mask,
                box_labels=find_input.input_boxes_label,
            )
            out = detector.forward_grounding(
                backbone_out=backbone_out,
                find_input=find_input,
                find_target=find_target,
                geometric_prompt=prompt,
            )
            if with_targets and not self.training:
                detector._compute_matching(out, detector.back_convert(find_target))
            stages.append([out])
        return stages
