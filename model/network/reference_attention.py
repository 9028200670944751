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

from model.network.sequence_parallel import LocalTokens


@dataclass
class ReferenceMapRequest:
    """Asks a self-attention call for the reference map of a contiguous run of batch items.

    token_masks: [b, C, L_ref] 0/1 masks of C classes (person 1, person 2, background) over the
    L_ref tokens of the first latent frame, one row per requested batch item.
    fused: compute it with the attention kernel (`reference_attention_map`) rather than the original's
    explicit softmax (`reference_attention_map_explicit`).
    """

    items: slice
    token_masks: torch.Tensor
    fused: bool = True
    local: LocalTokens | None = None  # this rank's tokens under sequence parallelism (None: all of them)
    result: torch.Tensor | None = None  # [b, C, S_local] once the attention ran


def apply_wan_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """3-axis RoPE of Wan on x [B, S, H, D]: channel pairs (2k, 2k+1) rotated by angle tables [1, S, 1, D/2] (fp32)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def reference_attention_map(query: torch.Tensor, key: torch.Tensor, token_masks: torch.Tensor,
                            backend=None) -> torch.Tensor:
    """Mean attention probability each query puts on each class region of the first latent frame.

    query, key: [b, S, H, D] after RoPE; token_masks: [b, C, L_ref], the first L_ref keys being the
    first latent frame. For head n: P_n = softmax(q·k_refᵀ/√D) over the L_ref reference keys only;
    map[c, i] = mean over heads of Σ_{j∈class c} P_n[i, j] / |class c|. Returns [b, C, S] in fp32.

    Σ_j P_n[i, j]·M_c[j] is an attention whose values are the 0/1 class masks, so one fused attention
    call (values padded to D channels, the masks in the first C) computes every head and class without
    materialising any [S, L_ref] probability matrix; the division by |class| happens afterwards in fp32.
    """
    batch, _, heads, head_dim = query.shape
    classes, ref_len = token_masks.shape[1:]
    if head_dim < classes:
        raise ValueError(f"head_dim {head_dim} is smaller than the {classes} reference classes")
    values = query.new_zeros(batch, ref_len, heads, head_dim)  # [b, L_ref, H, D]
    values[..., :classes] = token_masks.transpose(1, 2)[:, :, None, :].to(query.dtype)
    shares = dispatch_attention_fn(query, key[:, :ref_len], values, dropout_p=0.0, is_causal=False, backend=backend)
    shares = shares[..., :classes].float().mean(dim=2)  # [b, S, C]
    # An empty class would divide by zero (NaN in the original); it gets zero attention instead.
    sizes = token_masks.float().sum(-1).clamp_min(1)  # [b, C]
    return (shares / sizes[:, None, :]).transpose(1, 2)


def reference_attention_map_explicit(query: torch.Tensor, key: torch.Tensor, token_masks: torch.Tensor) -> torch.Tensor:
    """The same map as `reference_attention_map`, computed as the original does: an explicit softmax per head.

    Kept as the reference schedule's formulation (benchmarks, parity checks). One [b, S, L_ref]
    probability matrix exists at a time (the original materialises half of the heads at once).
    """
    batch, seq, heads, head_dim = query.shape
    ref_len = token_masks.shape[-1]
    key_ref = key[:, :ref_len]
    masks = token_masks.to(query.dtype)
    class_weights = masks / masks.sum(-1, keepdim=True).clamp_min(1)  # [b, C, L_ref]
    scale = head_dim**-0.5
    total = query.new_zeros(batch, masks.shape[1], seq)
    for head in range(heads):
        logits = (query[:, :, head] * scale) @ key_ref[:, :, head].transpose(1, 2)  # [b, S, L_ref]
        probs = logits.softmax(dim=-1)
        total += class_weights @ probs.transpose(1, 2)  # [b, C, S]
    return (total / heads).float()


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
            items = reference_map.items
            key_ref = key[items]
            if reference_map.local is not None:  # the first frame's keys, wherever their rank is
                key_ref = reference_map.local.first_tokens(key_ref, reference_map.token_masks.shape[-1])
            with torch.no_grad():
                if reference_map.fused:
                    reference_map.result = reference_attention_map(
                        query[items], key_ref, reference_map.token_masks, self._attention_backend)
                else:
                    reference_map.result = reference_attention_map_explicit(
                        query[items], key_ref, reference_map.token_masks)

        out = attn.to_out[0](out)
        return attn.to_out[1](out)
