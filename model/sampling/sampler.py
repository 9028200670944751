"""One clip's denoising loop: flow-matching Euler steps with guidance and motion-frame injection.

Per step i: the guided velocity v̂ at t'_i, then x ← x − v̂·(σ_i − σ_{i+1}) in fp32, exactly the original's
`latent + (−v̂)·((t'_i − t'_{i+1})/1000)`. For clips after the first, the latent frames that encode the
carried motion frames are overwritten before the first step and after every step with
`(1 − σ)·z_m + σ·ε` at the σ of the next step, fresh noise each time (so they end equal to z_m).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from model.sampling.guidance import GuidanceCombiner, GuidanceConfig, GuidanceInputs, guided_velocity
from model.sampling.schedule import noise_levels
from model.sampling.teacache import TeaCache, TeaCacheConfig


@dataclass
class ClipInputs:
    noise: torch.Tensor  # [16, T, h, w] fp32, the initial latent
    condition: torch.Tensor  # y [1, 4 + 16, T, h, w]: frame mask ++ VAE latent of the conditioning video
    guidance_inputs: GuidanceInputs
    motion_latents: torch.Tensor | None = None  # [16, T_m, h, w] for clips after the first


def _inject_motion(latent: torch.Tensor, motion: torch.Tensor, sigma: torch.Tensor,
                   generator: torch.Generator | None) -> None:
    noise = torch.randn(motion.shape, generator=generator, dtype=motion.dtype, device=motion.device)
    latent[:, : motion.shape[1]] = (1 - sigma) * motion + sigma * noise


@torch.no_grad()
def sample_clip(
    transformer,
    inputs: ClipInputs,
    timesteps: torch.Tensor,
    guidance: GuidanceConfig,
    generator: torch.Generator | None = None,
    teacache: TeaCacheConfig | None = None,
    on_step: Callable[[int, int], None] | None = None,
    batched_guidance: bool = True,
) -> tuple[torch.Tensor, TeaCache | None]:
    """Denoise one clip: returns the final latent [16, T, h, w] (fp32) and the clip's TeaCache (or None).

    timesteps: [steps + 1] from `sampling_timesteps`. on_step(step, steps) runs after every step (progress,
    cancellation: it may raise to stop). batched_guidance=False runs the guidance passes one at a time (the
    original's schedule, for benchmarks and parity checks).
    """
    device = inputs.noise.device
    timesteps = timesteps.to(device)
    sigmas = noise_levels(timesteps)
    steps = len(timesteps) - 1
    latent = inputs.noise.clone().float()
    motion = None if inputs.motion_latents is None else inputs.motion_latents.to(device=device, dtype=latent.dtype)
    if motion is not None:
        _inject_motion(latent, motion, sigmas[0], generator)

    batch_kwargs = inputs.guidance_inputs.transformer_kwargs(guidance.text_scale, transformer.dtype)
    combiner = GuidanceCombiner(guidance)
    cache = TeaCache(teacache, guidance.pass_names) if teacache is not None else None
    condition = inputs.condition.to(device=device, dtype=latent.dtype)
    for i in range(steps):
        latent_input = torch.cat([latent[None], condition], dim=1)  # [1, 36, T, h, w]
        velocity = guided_velocity(transformer, latent_input, timesteps[i : i + 1], batch_kwargs, combiner, cache,
                                   batched_guidance)
        dt = (timesteps[i] - timesteps[i + 1]) / 1000
        latent = latent + (-velocity[0].float()) * dt
        if motion is not None:
            _inject_motion(latent, motion, sigmas[i + 1], generator)
        if on_step is not None:
            on_step(i + 1, steps)
    return latent, cache
