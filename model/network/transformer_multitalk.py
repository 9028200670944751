"""The MultiTalk transformer: Wan2.1-I2V's diffusion transformer plus MultiTalk's audio adapter.

Built from diffusers' Wan pieces. Each block is a `WanTransformerBlock` with one more step between the
text/image cross-attention and the feed-forward: `x += audio_attn(norm_audio(x))`, the per-frame audio
cross-attention of `audio_attention.py`. The model owns its forward because the stock one cannot pass
audio to the blocks. The block is registered with diffusers' `TransformerBlockRegistry` so its cache
hooks (FirstBlockCache, MagCache, ...) apply, and all attention goes through `dispatch_attention_fn`
so `set_attention_backend` applies.

Shapes below: B batch, T latent frames, h × w latent size, N_h × N_w = h/2 × w/2 token grid,
S = T·N_h·N_w tokens, P speakers, F = 4(T−1)+1 video frames.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models._modeling_parallel import (
    ContextParallelInput,
    ContextParallelOutput,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import (
    WanRotaryPosEmbed,
    WanTransformer3DModel,
    WanTransformerBlock,
)

from model.network.audio_attention import AudioConditioning, MultiTalkAudioAttention
from model.network.audio_projection import MultiTalkAudioProjModel
from model.network.configs import TEXT_LEN
from model.network.reference_attention import (
    MultiTalkSelfAttnProcessor,
    ReferenceMapRequest,
)
from model.network.sequence_parallel import LocalTokens


class Float64SinusoidalTimesteps(nn.Module):
    """Wan's timestep sinusoid [cos | sin] computed in float64 and returned in fp32, as the original.

    diffusers' `Timesteps` computes it in fp32, which at t ≈ 1000 is off by ~1e-4.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        position = timesteps.to(torch.float64)
        freqs = torch.pow(10000, -torch.arange(half, device=timesteps.device, dtype=torch.float64).div(half))
        sinusoid = torch.outer(position, freqs)
        return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


class CachedWanRotaryTables(WanRotaryPosEmbed):
    """Wan's 3-axis RoPE as angle tables (cos, sin), each [1, S, 1, D/2] in fp32, built once per token grid.

    diffusers' `WanRotaryPosEmbed` rebuilds [1, S, 1, D] tables (every value twice) on every forward and the
    rotation then takes every other channel in every attention call; a request's grid never changes between
    steps, so the halves are built once and kept (one grid at a time, per device).
    """

    def __init__(self, attention_head_dim: int, patch_size: tuple[int, ...], max_seq_len: int):
        super().__init__(attention_head_dim, patch_size, max_seq_len)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(hidden_states.shape[2:]), hidden_states.device)
        if key not in self._tables:
            cos, sin = super().forward(hidden_states)  # [1, S, 1, D], each angle repeated for its channel pair
            self._tables = {key: (cos[..., 0::2].float().contiguous(), sin[..., 1::2].float().contiguous())}
        return self._tables[key]


# The two token-wise updates around attention and the FFN, written in place on one fp32 temporary: the
# expressions `norm(x) * (1 + scale) + shift` and `x.float() + y * gate` hold up to three fp32 copies of the
# activations at once (≈ 2 GB each for 480p with 3 guidance passes, 4.6 GB at 720p), these hold one. Same
# operations in the same order (fp32 addition commutes), so the results are bit-identical.
def modulated(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`normed * (1 + scale) + shift` in place on `normed` (a fresh fp32 tensor)."""
    return normed.mul_(1 + scale).add_(shift)


def gated_residual(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`residual.float() + update * gate` (gate fp32) rounded to the residual's dtype."""
    return (update * gate).add_(residual).type_as(residual)


class TokenChunkedRMSNorm(nn.RMSNorm):
    """Wan's q/k RMSNorm across heads, applied to a few thousand tokens at a time outside torch.compile.

    Eager `rms_norm` upcasts its whole input to fp32 and keeps about three fp32 copies alive: for 3 guidance
    passes at 480p that is ≈ 5.8 GB on top of the step's other activations, and it is the step's peak (the
    query norm of the cross-attention). The norm is row-wise, so normalising slices of tokens gives the same
    numbers. Compiled blocks fuse the norm and need no slicing.
    """

    chunk_tokens = 4096

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps, elementwise_affine=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[-2]
        if torch.compiler.is_compiling() or tokens <= self.chunk_tokens:  # compiling first: no guard on the size
            return super().forward(hidden_states)
        out = None
        for start in range(0, tokens, self.chunk_tokens):
            normed = super().forward(hidden_states[..., start : start + self.chunk_tokens, :])
            if out is None:
                out = hidden_states.new_empty(hidden_states.shape, dtype=normed.dtype)
            out[..., start : start + normed.shape[-2], :] = normed
        return out


class MultiTalkTransformerBlock(WanTransformerBlock):
    """Wan block + MultiTalk's audio cross-attention (after the text/image cross-attention)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        cross_attn_norm: bool,
        eps: float,
        added_kv_proj_dim: int | None,
        audio_output_dim: int,
        audio_context_tokens: int,
        class_range: int,
        class_interval: int,
    ):
        super().__init__(dim, ffn_dim, num_heads, "rms_norm_across_heads", cross_attn_norm, eps, added_kv_proj_dim)
        self.attn1.set_processor(MultiTalkSelfAttnProcessor())
        for attention in (self.attn1, self.attn2):
            attention.norm_q = TokenChunkedRMSNorm(dim, eps)
            attention.norm_k = TokenChunkedRMSNorm(dim, eps)
        self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.audio_attn = MultiTalkAudioAttention(
            dim, num_heads, audio_output_dim, audio_context_tokens, class_range, class_interval
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio: AudioConditioning | None = None,
    ) -> torch.Tensor:
        # temb: [B, 6, dim] → six [B, 1, dim] modulation vectors, in fp32.
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)

        # 1. Self-attention (optionally also the reference map the audio attention routes by)
        map_request = None
        map_items = audio.reference_map_items() if audio is not None else None
        if map_items is not None:
            map_request = ReferenceMapRequest(map_items, audio.token_masks[map_items], fused=not audio.map_everywhere,
                                              local=audio.local)
        norm_hidden_states = modulated(self.norm1(hidden_states.float()), scale_msa, shift_msa).type_as(hidden_states)
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb, reference_map=map_request)
        hidden_states = gated_residual(hidden_states, attn_output, gate_msa)

        # 2. Text + image cross-attention
        norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
        hidden_states = hidden_states + self.attn2(norm_hidden_states, encoder_hidden_states, None, None)

        # 3. Audio cross-attention
        if audio is not None:
            norm_hidden_states = self.norm_audio(hidden_states.float()).type_as(hidden_states)
            reference_map = map_request.result if map_request is not None else None
            hidden_states = hidden_states + self.audio_attn(norm_hidden_states, audio, reference_map)

        # 4. Feed-forward
        norm_hidden_states = modulated(self.norm3(hidden_states.float()), c_scale_msa, c_shift_msa).type_as(hidden_states)
        return gated_residual(hidden_states, self.ffn(norm_hidden_states), c_gate_msa)



TransformerBlockRegistry.register(
    MultiTalkTransformerBlock,
    TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)


def mark_grid_sizes_dynamic(hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor],
                            audio: AudioConditioning) -> None:
    """Mark the block inputs' sizes that follow the request's frame size and clip length as dynamic for torch.compile:
    the tokens S of the hidden states and RoPE tables, the latent frames T of the audio tokens and the tokens per
    frame N_h·N_w of the person masks.

    Compiled blocks (`ExecutionOptions.compile`) are then traced once with symbolic sizes and serve every bucket of
    both resolutions and every clip length without recompiling; left static, each new grid would recompile the
    blocks mid-request (minutes on the 14B model), and after torch._dynamo's recompile limit run them eagerly.
    `maybe_`: a size that some kernel needs static costs a recompile instead of failing the request. Without
    compilation this only tags the tensors.
    """
    torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
    for table in rotary_emb:
        torch._dynamo.maybe_mark_dynamic(table, 1)
    torch._dynamo.maybe_mark_dynamic(audio.tokens, 1)
    torch._dynamo.maybe_mark_dynamic(audio.token_masks, 2)


class MultiTalkTransformer3DModel(WanTransformer3DModel):
    """Wan2.1-I2V transformer with MultiTalk's audio adapter (`audio_proj` + per-block audio attention)."""

    _no_split_modules = ["MultiTalkTransformerBlock"]
    _repeated_blocks = ["MultiTalkTransformerBlock"]
    # time_proj too: the blocks' modulation is computed in fp32 (`time_conditioning`), as the original and LightX2V.
    _keep_in_fp32_modules = [*WanTransformer3DModel._keep_in_fp32_modules, "time_proj", "norm_audio"]
    # Sequence parallelism (diffusers context parallelism): the RoPE tables and the tokens entering the blocks
    # are split across ranks, the head's output gathered; the audio attention and the reference map handle
    # their cross-rank needs themselves (model/sequence_parallel.py). The text/image context is not split.
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "token_shard": {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        image_dim: int = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        audio_window: int = 5,
        audio_layers: int = 12,
        audio_dim: int = 768,
        audio_intermediate_dim: int = 512,
        audio_output_dim: int = 768,
        audio_context_tokens: int = 32,
        vae_scale: int = 4,
        class_range: int = 24,
        class_interval: int = 4,
    ):
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
        )
        inner_dim = num_attention_heads * attention_head_dim
        self.condition_embedder.timesteps_proj = Float64SinusoidalTimesteps(freq_dim)
        self.blocks = nn.ModuleList(
            [
                MultiTalkTransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    cross_attn_norm,
                    eps,
                    added_kv_proj_dim,
                    audio_output_dim,
                    audio_context_tokens,
                    class_range,
                    class_interval,
                )
                for _ in range(num_layers)
            ]
        )
        self.audio_proj = MultiTalkAudioProjModel(
            window=audio_window,
            vae_scale=vae_scale,
            audio_layers=audio_layers,
            audio_dim=audio_dim,
            intermediate_dim=audio_intermediate_dim,
            output_dim=audio_output_dim,
            context_tokens=audio_context_tokens,
        )
        self.rope = CachedWanRotaryTables(attention_head_dim, patch_size, rope_max_seq_len)
        # Where the token sequence is split across ranks under sequence parallelism (a no-op otherwise). A module
        # of its own, rather than the first block's input, so that TeaCache's skipped steps are split too.
        self.token_shard = nn.Identity()
        # "fused": the reference map only in 2-speaker passes, through the attention kernel; "original": in
        # every pass with an explicit softmax, as the original does (the reference schedule, parity checks).
        self.reference_map_mode = "fused"

    def _audio_conditioning(
        self,
        audio_embeds: torch.Tensor,
        num_speakers: Sequence[int] | None,
        ref_target_masks: torch.Tensor,
        grid: tuple[int, int, int],
        dtype: torch.dtype,
    ) -> AudioConditioning:
        batch, max_speakers = audio_embeds.shape[:2]
        speakers = list(num_speakers) if num_speakers is not None else [max_speakers] * batch
        if len(speakers) != batch or not all(1 <= n <= max_speakers for n in speakers):
            raise ValueError(f"num_speakers {speakers} does not fit audio_embeds of shape {tuple(audio_embeds.shape)}")
        tokens = self.audio_proj(audio_embeds.flatten(0, 1).to(dtype))  # [B·P, T, K, C]
        tokens = tokens.unflatten(0, (batch, max_speakers)).transpose(1, 2).flatten(2, 3)  # [B, T, P·K, C]

        # Person masks [3, h, w] (or [B, 3, h, w]) → 0/1 masks over the N_h × N_w tokens of one frame.
        masks = ref_target_masks if ref_target_masks.ndim == 4 else ref_target_masks[None].expand(batch, -1, -1, -1)
        masks = F.interpolate(masks.float(), size=grid[1:], mode="nearest") > 0
        token_masks = masks.flatten(2).to(dtype)  # [B, 3, N_h·N_w]
        local = LocalTokens.of(grid[0] * grid[1] * grid[2], grid[1] * grid[2], self._parallel_config)
        return AudioConditioning(tokens.to(dtype), speakers, token_masks, grid, local if local.is_parallel else None,
                                 self.reference_map_mode == "original")

    def time_conditioning(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] → time embedding [B, dim] and the blocks' modulation input [B, 6·dim], both in fp32.

        diffusers' condition embedder casts the embedding to the text's dtype, so in a bf16 model every block's
        shift, scale and gate would carry bf16 rounding (≈ 2⁻⁹ relative) and TeaCache's change signal more noise.
        The original and LightX2V compute them in fp32: the two small linears are kept in fp32 when loaded
        (`_keep_in_fp32_modules`), and their modules are called (so forward hooks see them, as the parity checks do).
        """
        embedder = self.condition_embedder
        sinusoid = embedder.timesteps_proj(timestep)  # fp32
        temb = embedder.time_embedder(sinusoid.to(embedder.time_embedder.linear_1.weight.dtype)).float()
        return temb, embedder.time_proj(embedder.act_fn(temb).to(embedder.time_proj.weight.dtype)).float()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        audio_embeds: torch.Tensor,
        ref_target_masks: torch.Tensor,
        num_speakers: Sequence[int] | None = None,
        block_cache: Callable | None = None,
        return_dict: bool = True,
        attention_kwargs: dict | None = None,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """One denoising pass (or a batch of guidance passes).

        hidden_states: [B, 36, T, h, w] = noisy latent (16) ++ frame mask (4) ++ condition latent (16).
        timestep: [B] in [0, 1000]. encoder_hidden_states: [B, L ≤ 512, 4096] UMT5 features (zero-padded
        to 512 here). encoder_hidden_states_image: [B, 257, 1280] CLIP features.
        audio_embeds: [B, P, F, window, audio_layers, audio_dim] wav2vec2 windows per video frame.
        ref_target_masks: [3, h, w] or [B, 3, h, w] person 1 / person 2 / background masks.
        num_speakers: speakers per batch item (default P for all); an item with fewer uses only its
        first streams, e.g. the null-audio guidance pass (1 zero stream) batched with 2-speaker passes.
        block_cache: optional `(hidden_states, temb, timestep_proj, run_blocks) → hidden_states` that may
        replay cached block residuals instead of running the stack (TeaCache).
        Returns the flow-matching velocity [B, 16, T, h, w] in fp32.
        """
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)

        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, S, dim]

        text_len = encoder_hidden_states.shape[1]
        if text_len > TEXT_LEN:
            raise ValueError(f"text context has {text_len} tokens, at most {TEXT_LEN} allowed")
        encoder_hidden_states = F.pad(encoder_hidden_states, (0, 0, 0, TEXT_LEN - text_len))
        temb, timestep_proj = self.time_conditioning(timestep)
        encoder_hidden_states = self.condition_embedder.text_embedder(encoder_hidden_states)
        encoder_hidden_states_image = self.condition_embedder.image_embedder(encoder_hidden_states_image)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # [B, 6, dim]
        context = torch.cat([encoder_hidden_states_image, encoder_hidden_states], dim=1).to(hidden_states.dtype)

        audio = self._audio_conditioning(audio_embeds, num_speakers, ref_target_masks, grid, hidden_states.dtype)
        hidden_states = self.token_shard(hidden_states)  # [B, S_local, dim]
        mark_grid_sizes_dynamic(hidden_states, rotary_emb, audio)

        def run_blocks(states: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                states = block(states, context, timestep_proj, rotary_emb, audio)
            return states

        if block_cache is None:
            hidden_states = run_blocks(hidden_states)
        else:
            hidden_states = block_cache(hidden_states, temb, timestep_proj, run_blocks)

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)  # [B, S, p_t·p_h·p_w·16]

        # Unpatchify: each token's outputs are (p_t, p_h, p_w, C) with C fastest.
        hidden_states = hidden_states.reshape(batch, *grid, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3).float()
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _resolve_parallel_config(self, config):
        """diffusers places rank r on accelerator r mod count, which divides by zero without one; on the CPU
        (gloo: tests, debugging) every rank runs on the CPU."""
        if torch.accelerator.device_count() > 0:
            return super()._resolve_parallel_config(config)
        from diffusers.models._modeling_parallel import ParallelConfig

        config = config if isinstance(config, ParallelConfig) else ParallelConfig(context_parallel_config=config)
        cp = config.context_parallel_config
        mesh = cp.mesh or torch.distributed.device_mesh.init_device_mesh("cpu", cp.mesh_shape,
                                                                          mesh_dim_names=cp.mesh_dim_names)
        config.setup(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device("cpu"), mesh=mesh)
        self._parallel_config = config
        return config

    @property
    def num_parameters_by_part(self) -> dict[str, int]:
        """Parameter counts of the base Wan transformer and of the audio adapter."""
        adapter = sum(p.numel() for n, p in self.named_parameters() if is_adapter_parameter(n))
        total = sum(p.numel() for p in self.parameters())
        return {"base": total - adapter, "audio_adapter": adapter, "total": total}


def is_adapter_parameter(name: str) -> bool:
    return name.startswith("audio_proj.") or ".audio_attn." in name or ".norm_audio." in name

