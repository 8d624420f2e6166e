"""LoRA adapters on the SAM3 detector through `peft`, and their merge back into plain weights.

Which layers peft can adapt in sam3 (see `LoraConfig.targets`): `nn.Linear` layers that are
*called*: the ViT blocks' `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`; the encoder / decoder
layers' `linear1`, `linear2`; the text blocks' `mlp.c_fc`, `mlp.c_proj`; heads' MLP layers.

Not the attention modules of the fusion encoder, decoder and text encoder
(`nn.MultiheadAttention` and sam3's `MultiheadAttentionWrapper`): their projections are a fused
`in_proj_weight` parameter and an `out_proj` linear that `F.multi_head_attention_forward` reads
without calling it, so an adapter on `out_proj` alone would never act. peft 0.21.2 adapts such a
module as a whole by merging the adapter into the weights around every forward, but applies the
out_proj delta twice (huggingface/peft#3774, open) and rewrites the frozen weights on every call;
these are refused with a ConfigError until that is fixed.

Adapters live inside the training model (state-dict keys gain `.base_layer.` and `.lora_A/B.`),
so training checkpoints hold them and resume exactly. `merged_state_dict` folds them into the
base weights (peft's delta, computed on the CPU), giving the official `detector.*` layout that
predict and the model registry use; `merge_adapted_state` does the same for a checkpoint saved
with adapters, through peft's `merge_and_unload`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from sam3_core.errors import ConfigError
from sam3_core.model.config import LoraConfig

log = logging.getLogger(__name__)
ADAPTER = "default"
_ADAPTER_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def target_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the linears `cfg` adapts: those under `cfg.modules` whose last name part is in `cfg.targets`."""
    attention = {name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)}
    names = []
    for name, module in model.named_modules():
        under = any(name == prefix or name.startswith(prefix + ".") for prefix in cfg.modules)
        if not under or name.rsplit(".", 1)[-1] not in cfg.targets:
            continue
        if name in attention:
            raise ConfigError(
                f"{cfg.KEY}.targets: {name} is an attention module (nn.MultiheadAttention); peft 0.21.2 adapts those "
                "wrongly (huggingface/peft#3774). Target linears: qkv, proj, fc1, fc2, linear1, linear2"
            )
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[0] not in attention:
            names.append(name)
    if not names:
        raise ConfigError(
            f"{cfg.KEY}: no linear named {list(cfg.targets)} under {list(cfg.modules)}; "
            f"check {cfg.KEY}.modules and {cfg.KEY}.targets against the module names"
        )
    return names


def _peft_config(cfg: LoraConfig, targets: list[str]) -> Any:
    import peft

    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none"
    )


def add_adapters(detector: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject LoRA adapters into `detector` in place; only they (and `cfg.trainable`) stay trainable.

    Returns the adapted layers' names. The adapters start as a no-op (lora_B is zero), so the
    adapted model computes what the base model did.
    """
    import peft

    targets = target_modules(detector, cfg)
    peft.inject_adapter_in_model(_peft_config(cfg, targets), detector, adapter_name=ADAPTER)
    for name, param in detector.named_parameters():
        adapter = bool(_ADAPTER_KEY.search(f".{name}"))
        kept = any(name.startswith(prefix) for prefix in cfg.trainable)
        param.requires_grad_(adapter or (kept and param.requires_grad))
    log.info("LoRA rank %d on %d layers under %s", cfg.rank, len(targets), list(cfg.modules))
    return targets


def has_adapters(state: dict[str, Any]) -> bool:
    return any(_ADAPTER_KEY.search(key) for key in state)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of `model` by name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every adapter folded into its base weight and the adapter keys gone.

    The model itself is left as it is (training goes on); the keys are those of the model
    without adapters, so the result loads into a plain detector. The merge (peft's delta,
    `lora_B @ lora_A * scaling`) runs on the CPU from host copies of the adapted layers: on a GPU
    it would take a second copy of every adapted weight in device memory, on the saving rank only.
    Weights without adapters are returned as they are (on the model's device).
    """
    state = model.state_dict()
    if not has_adapters(state):
        return state
    merged = dict(state)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            key = f"{name}.base_layer.weight"
            lora_a = state[f"{name}.lora_A.{ADAPTER}.weight"].cpu()
            lora_b = state[f"{name}.lora_B.{ADAPTER}.weight"].cpu()
            base = state[key].cpu()
            merged[key] = base + (lora_b @ lora_a * layer.scaling[ADAPTER]).to(base.dtype)
    return {key.replace(".base_layer.", "."): value for key, value in merged.items() if not _ADAPTER_KEY.search(key)}


def merge_adapted_state(
    model: nn.Module, state: dict[str, torch.Tensor], lora: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Plain weights from a state dict saved with adapters (`lora`: the saved `LoraConfig` fields).

    peft injects those adapters into `model.detector` (a plain detector), the state is loaded,
    and peft merges them back and unloads itself: `model` ends plain, holding the merged weights.
    Returned: the merged weights of the keys the checkpoint had, named as in a plain model.
    """
    import peft

    cfg = LoraConfig(**lora)
    tuner = peft.tuners.lora.LoraModel(model.detector, _peft_config(cfg, target_modules(model.detector, cfg)), ADAPTER)
    model.load_state_dict(state, strict=False)
    model.detector = tuner.merge_and_unload()
    saved = {key.replace(".base_layer.", ".") for key in state if not _ADAPTER_KEY.search(key)}
    return {key: value for key, value in model.state_dict().items() if key in saved}


def lora_settings(cfg: LoraConfig) -> dict[str, Any] | None:
    """What a checkpoint records to rebuild its adapters (None without adapters)."""
    return dataclasses.asdict(cfg) if cfg.rank > 0 else None
