"""Image encoder: the visual tower of open-clip XLM-RoBERTa ViT-H/14 as transformers' `CLIPVisionModel`.

MultiTalk feeds the transformer the output of the *penultimate* block (no post-norm, no head) for
the conditioning frame squashed to 224 × 224 with a plain bicubic resize (no antialias, no crop) —
not what `CLIPImageProcessor` does, so the preprocessing is restated here in torch. Only the blocks
that are used are loaded (the last one never is).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from transformers import CLIPVisionConfig, CLIPVisionModel

from model.weights.keymaps import TensorRule, original_clip_visual_rules
from model.weights.streaming import CheckpointFiles, WeightsError, load_into_empty_model

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_HEAD_DIM = 80  # open-clip ViT-H/14: width 1280 over 16 heads


def clip_pixel_values(frames: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, 3, 1, H, W] (or [B, 3, H, W]) frames in [-1, 1] → normalised [B, 3, size, size] CLIP input."""
    if frames.ndim == 5:
        frames = frames[:, :, -1]
    resized = F.interpolate(frames.float(), size=(size, size), mode="bicubic", align_corners=False)
    pixels = resized * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def clip_vision_config_from_original(shapes: Mapping[str, Sequence[int]], num_heads: int | None = None) -> CLIPVisionConfig:
    """CLIPVisionConfig from an open-clip visual tower's shapes; heads default to width / 80 (ViT-H)."""
    width, _, patch, _ = shapes["visual.patch_embedding.weight"]
    positions = shapes["visual.pos_embedding"][-2]
    layers = len({m.group(1) for k in shapes if (m := re.match(r"^visual\.transformer\.(\d+)\.", k))})
    heads = num_heads or width // VIT_H_HEAD_DIM
    if heads < 1 or width % heads:
        raise WeightsError(f"CLIP visual width {width} does not split over {heads} heads")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=shapes["visual.transformer.0.mlp.0.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=int(round((positions - 1) ** 0.5)) * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def load_clip_from_original(
    path: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    num_heads: int | None = None,
    skip_last_layer: bool = True,
) -> "WanImageEncoder":
    """Load the visual tower from Wan's whole-CLIP `.pth` (text tower and projection heads ignored)."""
    source = CheckpointFiles([Path(path)])
    config = clip_vision_config_from_original(source.shapes(), num_heads)
    return _load(config, source, original_clip_visual_rules, dtype, device, skip_last_layer, str(path))


def load_clip_from_pretrained(
    folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu", skip_last_layer: bool = True
) -> "WanImageEncoder":
    """Load a transformers `CLIPVisionModel` folder (the diffusers-format repo's `image_encoder/`)."""
    folder = Path(folder)
    config = CLIPVisionConfig.from_pretrained(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors in {folder}")
    source = CheckpointFiles(files)

    def rules(keys, num_layers):
        out = {}
        for key in keys:
            target = key.removeprefix("vision_model.")
            block = re.match(r"^encoder\.layers\.(\d+)\.", target)
            if target.startswith("visual_projection.") or target == "embeddings.position_ids":
                continue
            if block and int(block.group(1)) >= num_layers:
                continue
            out[target] = TensorRule(key)
        return out

    return _load(config, source, rules, dtype, device, skip_last_layer, str(folder))


def _load(config, source, make_rules, dtype, device, skip_last_layer, where) -> "WanImageEncoder":
    full_layers = config.num_hidden_layers
    if skip_last_layer:
        config.num_hidden_layers = full_layers - 1
    with init_empty_weights():
        model = CLIPVisionModel(config)
    rules = make_rules(source.keys(), config.num_hidden_layers)
    # post_layernorm exists in the module but MultiTalk never applies it: keep whatever the file has.
    rules = {k: v for k, v in rules.items() if not k.startswith("post_layernorm.")}
    model.post_layernorm = torch.nn.Identity()
    load_into_empty_model(model, source, rules, dtype=dtype, device=device, what=f"CLIP visual tower {where}")
    return WanImageEncoder(model.eval(), feature_layer=full_layers - 1)


class WanImageEncoder:
    """CLIP features of the conditioning frame: hidden state after block `feature_layer − 1`."""

    def __init__(self, model: CLIPVisionModel, feature_layer: int):
        self.model = model
        self.feature_layer = feature_layer

    @torch.no_grad()
    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """hidden_states[0] = embeddings after pre-norm, [i] = output of block i − 1."""
        pixel_values = pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1, H, W] frames in [-1, 1] → [B, 257, width] features (the original's use_31_block)."""
        return self.hidden_states(clip_pixel_values(frames))[self.feature_layer]
