"""Self-attention of the MultiTalk block, which can also emit the reference-attention map.

MultiTalk decides which speaker a video token belongs to from the block's own self-attention: the
share of attention that the token's (RoPE'd) query puts on each person's region of the first
latent frame (the reference image). That needs the post-RoPE q/k that only the processor sees, so
this processor is Wan's self-attention plus an optional side output. The map goes into a
`ReferenceMapRequest` instead of the return value, so diffusers' caching hooks, which expect an
attention module to return one tensor, keep working.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections


@dataclass
class ReferenceMapRequest:
    """Asks a self-attention call for the reference map of some batch items.

    token_masks: [b, C, L_ref] 0/1 masks of C classes (person 1, person 2, background) over the
    L_ref tokens of the first latent frame, one row per requested batch item.
    """

    sample_indices: list[int]
    token_masks: torch.Tensor
    result: torch.Tensor | None = None  # [b, C, S] once the attention ran


def apply_wan_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """3-axis RoPE of Wan on x [B, S, H, D]: adjacent channel pairs rotated by the (1, S, 1, D) tables."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def reference_attention_map(query: torch.Tensor, key: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """Mean attention probability each query puts on each class region of the first latent frame.

    query, key: [b, S, H, D] after RoPE; token_masks: [b, C, L_ref], the first L_ref keys being the
    first latent frame. For head n: P_n = softmax(q·k_refᵀ/√D) over the L_ref reference keys only;
    map[c, i] = mean over heads of Σ_{j∈class c} P_n[i, j] / |class c|. Returns [b, C, S].

    Written as P_n @ (masks / |class|)ᵀ, one head at a time, so only one [b, S, L_ref] probability
    matrix exists at once (the original materialises half of the heads at a time).
    """
    batch, seq, heads, head_dim = query.shape
    ref_len = token_masks.shape[-1]
    key_ref = key[:, :ref_len]
    masks = token_masks.to(query.dtype)
    # An empty class would divide by zero (NaN in the original); it gets zero attention instead.
    class_weights = masks / masks.sum(-1, keepdim=True).clamp_min(1)  # [b, C, L_ref]
    scale = head_dim**-0.5
    total = query.new_zeros(batch, masks.shape[1], seq)
    for head in range(heads):
        logits = (query[:, :, head] * scale) @ key_ref[:, :, head].transpose(1, 2)  # [b, S, L_ref]
        probs = logits.softmax(dim=-1)
        total += class_weights @ probs.transpose(1, 2)  # [b, C, S]
    return total / heads


class MultiTalkSelfAttnProcessor:
    """Wan's self-attention (q/k RMSNorm across heads, 3-axis RoPE) + the optional reference map."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        reference_map: ReferenceMapRequest | None = None,
    ) -> torch.Tensor:
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary_emb(query, *rotary_emb)
            key = apply_wan_rotary_emb(key, *rotary_emb)

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).type_as(query)

        if reference_map is not None:
            idx = reference_map.sample_indices
            with torch.no_grad():
                reference_map.result = reference_attention_map(query[idx], key[idx], reference_map.token_masks)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)
