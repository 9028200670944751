"""Key maps from the published checkpoint formats to our model classes.

Every map here is a pure renaming `{source key: target key}` (plus, for CLIP, the few tensors that
must be reshaped or split), computed from key *names* only, so a loader can plan a whole load from
the safetensors headers before reading a byte of tensor data.

- DiT (original Wan / MultiTalk keys → `MultiTalkTransformer3DModel`): the audio keys by our own
  table first (diffusers' converter renames by substring and would mangle them:
  `audio_cross_attn` → `audio_attn2`), then the rest through diffusers'
  `convert_wan_transformer_to_diffusers`.
- VAE (`Wan2.1_VAE.pth` → `AutoencoderKLWan`): diffusers' `convert_wan_vae_to_diffusers`.
- umT5 (`models_t5_umt5-xxl-enc-bf16.pth` → transformers `UMT5EncoderModel`) and CLIP
  (`models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` visual tower → `CLIPVisionModel`):
  explicit tables, since neither library ships a converter for Wan's own files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers, convert_wan_vae_to_diffusers

_AUDIO_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(audio_cross_attn\.(q_linear|kv_linear|proj)|norm_x)\.(weight|bias)$")
_AUDIO_ATTN_NAMES = {"q_linear": "to_q", "kv_linear": "to_kv", "proj": "to_out"}


def is_original_audio_key(key: str) -> bool:
    """True for the keys of MultiTalk's audio adapter in the original layout (`multitalk.safetensors`)."""
    return key.startswith("audio_proj.") or _AUDIO_BLOCK_KEY.match(key) is not None


def audio_key_to_ours(key: str) -> str:
    if key.startswith("audio_proj."):
        return key
    match = _AUDIO_BLOCK_KEY.match(key)
    block, part, attn_name, kind = match.group(1), match.group(2), match.group(3), match.group(4)
    if part == "norm_x":
        return f"blocks.{block}.norm_audio.{kind}"
    return f"blocks.{block}.audio_attn.{_AUDIO_ATTN_NAMES[attn_name]}.{kind}"


def _renaming_from_converter(converter: Callable[[dict], dict], keys: Iterable[str]) -> dict[str, str]:
    """Run a diffusers converter on {key: key} to learn its renaming without any tensor."""
    converted = converter({k: k for k in keys})
    return {source: target for target, source in converted.items()}


def original_dit_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Original Wan/MultiTalk DiT keys (with or without the `model.diffusion_model.` prefix) → ours."""
    keys = list(keys)
    stripped = {k: k.removeprefix("model.diffusion_model.") for k in keys}
    audio = {k: audio_key_to_ours(s) for k, s in stripped.items() if is_original_audio_key(s)}
    base_sources = [s for k, s in stripped.items() if k not in audio]
    base = _renaming_from_converter(convert_wan_transformer_to_diffusers, base_sources)
    by_stripped = {s: k for k, s in stripped.items()}
    return {**audio, **{by_stripped[s]: t for s, t in base.items()}}


def original_vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Original `Wan2.1_VAE.pth` keys → `AutoencoderKLWan` keys."""
    return _renaming_from_converter(convert_wan_vae_to_diffusers, keys)


def original_t5_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Wan's umT5 encoder keys → `UMT5EncoderModel` keys (the token embedding is shared with the encoder)."""
    table = [
        (r"^token_embedding\.weight$", "shared.weight"),
        (r"^blocks\.(\d+)\.norm1\.weight$", r"encoder.block.\1.layer.0.layer_norm.weight"),
        (r"^blocks\.(\d+)\.attn\.(q|k|v|o)\.weight$", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
        (
            r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$",
            r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        (r"^blocks\.(\d+)\.norm2\.weight$", r"encoder.block.\1.layer.1.layer_norm.weight"),
        (r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
        (r"^blocks\.(\d+)\.ffn\.fc1\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
        (r"^blocks\.(\d+)\.ffn\.fc2\.weight$", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
        (r"^norm\.weight$", "encoder.final_layer_norm.weight"),
    ]
    return _apply_table(keys, table, "umT5 encoder")


@dataclass(frozen=True)
class TensorRule:
    """How one target tensor is made from one source tensor (CLIP needs reshapes and q/k/v splits)."""

    source: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _split_qkv(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda t: t.chunk(3, dim=0)[index]


def original_clip_visual_rules(keys: Iterable[str], num_layers: int | None = None) -> dict[str, TensorRule]:
    """Open-CLIP ViT-H/14 `visual.*` keys → `CLIPVisionModel` tensors.

    The text tower (`textual.*`), `log_scale` and the unused `visual.post_norm`/`visual.head` are
    ignored. With `num_layers`, blocks from that index on are skipped (MultiTalk uses the output of
    the penultimate block, so the last block need not be loaded at all).
    """
    rules: dict[str, TensorRule] = {}
    simple = [
        (r"^visual\.patch_embedding\.weight$", "embeddings.patch_embedding.weight"),
        (r"^visual\.pre_norm\.(weight|bias)$", r"pre_layrnorm.\1"),
        (r"^visual\.transformer\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.layer_norm1.\2"),
        (r"^visual\.transformer\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.out_proj.\2"),
        (r"^visual\.transformer\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.layer_norm2.\2"),
        (r"^visual\.transformer\.(\d+)\.mlp\.0\.(weight|bias)$", r"encoder.layers.\1.mlp.fc1.\2"),
        (r"^visual\.transformer\.(\d+)\.mlp\.2\.(weight|bias)$", r"encoder.layers.\1.mlp.fc2.\2"),
    ]
    for key in keys:
        block = re.match(r"^visual\.transformer\.(\d+)\.", key)
        if block and num_layers is not None and int(block.group(1)) >= num_layers:
            continue
        if key == "visual.cls_embedding":
            rules["embeddings.class_embedding"] = TensorRule(key, lambda t: t.reshape(-1))
        elif key == "visual.pos_embedding":
            rules["embeddings.position_embedding.weight"] = TensorRule(key, lambda t: t.reshape(t.shape[-2], t.shape[-1]))
        elif qkv := re.match(r"^visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)$", key):
            for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
                rules[f"encoder.layers.{qkv.group(1)}.self_attn.{name}.{qkv.group(2)}"] = TensorRule(key, _split_qkv(index))
        else:
            for pattern, target in simple:
                if re.match(pattern, key):
                    rules[re.sub(pattern, target, key)] = TensorRule(key)
                    break
    return rules


def _apply_table(keys: Iterable[str], table: list[tuple[str, str]], what: str) -> dict[str, str]:
    mapping = {}
    for key in keys:
        for pattern, target in table:
            if re.match(pattern, key):
                mapping[key] = re.sub(pattern, target, key)
                break
        else:
            raise KeyError(f"unexpected key {key!r} in the {what} checkpoint")
    return mapping


def original_dit_keys(num_layers: int) -> list[str]:
    """Every tensor name of the published original-layout MultiTalk DiT (Wan shards + multitalk.safetensors)."""
    wb = ("weight", "bias")
    keys = [f"{m}.{p}" for m in ("patch_embedding", "text_embedding.0", "text_embedding.2", "time_embedding.0",
                                  "time_embedding.2", "time_projection.1", "img_emb.proj.0", "img_emb.proj.1",
                                  "img_emb.proj.3", "img_emb.proj.4", "head.head") for p in wb]
    keys.append("head.modulation")
    keys += [f"audio_proj.{m}.{p}" for m in ("proj1", "proj1_vf", "proj2", "proj3", "norm") for p in wb]
    for n in range(num_layers):
        b = f"blocks.{n}"
        keys += [f"{b}.self_attn.{m}.{p}" for m in "qkvo" for p in wb]
        keys += [f"{b}.self_attn.norm_q.weight", f"{b}.self_attn.norm_k.weight"]
        keys += [f"{b}.cross_attn.{m}.{p}" for m in ("q", "k", "v", "o", "k_img", "v_img") for p in wb]
        keys += [f"{b}.cross_attn.{m}.weight" for m in ("norm_q", "norm_k", "norm_k_img")]
        keys += [f"{b}.{m}.{p}" for m in ("norm3", "ffn.0", "ffn.2", "norm_x") for p in wb]
        keys += [f"{b}.audio_cross_attn.{m}.{p}" for m in ("q_linear", "kv_linear", "proj") for p in wb]
        keys.append(f"{b}.modulation")
    return keys


def original_t5_keys(num_layers: int) -> list[str]:
    """Every tensor name of Wan's `models_t5_umt5-xxl-enc-bf16.pth`."""
    keys = ["token_embedding.weight", "norm.weight"]
    for n in range(num_layers):
        keys += [f"blocks.{n}.{m}.weight" for m in ("norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2",
                                                     "ffn.gate.0", "ffn.fc1", "ffn.fc2", "pos_embedding.embedding")]
    return keys


def original_vae_keys_for(target_keys: Iterable[str]) -> dict[str, str]:
    """Original `Wan2.1_VAE.pth` name of every `AutoencoderKLWan` tensor name given.

    Found by running diffusers' converter over every name the original architecture can have and
    keeping those that land on a given target; raises if that is not a one-to-one match.
    """
    parts = [f"residual.{i}.gamma" for i in (0, 3)] + [f"{m}.{p}" for m in ("residual.2", "residual.6", "shortcut",
                                                                           "resample.1", "time_conv") for p in ("weight", "bias")]
    candidates = [f"{side}.{group}.{k}.{part}" for side, group in (("encoder", "downsamples"), ("decoder", "upsamples"))
                  for k in range(16) for part in parts]
    for side in ("encoder", "decoder"):
        candidates += [f"{side}.conv1.weight", f"{side}.conv1.bias", f"{side}.head.0.gamma", f"{side}.head.2.weight",
                       f"{side}.head.2.bias", f"{side}.middle.1.norm.gamma"]
        candidates += [f"{side}.middle.{i}.{part}" for i in (0, 2) for part in parts[:6]]
        candidates += [f"{side}.middle.1.{m}.{p}" for m in ("to_qkv", "proj") for p in ("weight", "bias")]
    candidates += [f"conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    forward = original_vae_key_map(candidates)
    targets = set(target_keys)
    inverse: dict[str, str] = {}
    for source, target in forward.items():
        if target in targets:
            if target in inverse:
                raise ValueError(f"VAE tensor {target} has two original names: {inverse[target]}, {source}")
            inverse[target] = source
    if set(inverse) != targets:
        raise ValueError(f"no original name for VAE tensors {sorted(targets - set(inverse))[:5]}")
    return inverse
