"""From prepared conditioning to decoded frames, clip by clip (spec §5.3–5.4, §8, §9, §10.1).

Per clip: seeded noise, the conditioning video (reference image, or the previous clip's last motion
frames) padded with grey frames and VAE-encoded behind the 4-channel frame mask, CLIP features of the
last conditioning frame, the speakers' audio windows, the guided Euler loop, VAE decode, colour
correction toward the reference image. The decoded frames that are new are yielded as soon as a clip is
done, so the caller can encode them while the next clip samples.

Components are duck-typed: `vae.encode([1, 3, F, H, W]) → [1, 16, T, h, w]` (normalised latents),
`vae.decode([1, 16, T, h, w]) → [1, 3, F, H, W]` in [−1, 1], `image_encoder.encode([1, 3, 1, H, W]) →
[1, 257, D]`, so the parity checks can run the loop with the original's stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from model.sampling.color_match import match_colors
from model.sampling.guidance import GuidanceConfig, GuidanceInputs
from model.sampling.long_video import ClipPlan, clip_audio, condition_video, frame_mask
from model.sampling.sampler import ClipInputs, sample_clip
from model.sampling.teacache import TeaCache, TeaCacheConfig

LATENT_CHANNELS = 16


@dataclass
class VideoConditioning:
    reference: torch.Tensor  # [1, 3, 1, H, W] bucketed reference image in [−1, 1] (fp32)
    embeddings: list[torch.Tensor]  # per speaker [L, layers, dim] wav2vec2 features at 25 fps
    context: torch.Tensor  # [L_text, text_dim] prompt features
    negative_context: torch.Tensor  # [L_neg, text_dim]
    ref_target_masks: torch.Tensor  # [3, h, w] person 1 / person 2 / background on the latent grid


@dataclass(frozen=True)
class SamplingSettings:
    timesteps: torch.Tensor  # [steps + 1] from `sampling_timesteps`
    guidance: GuidanceConfig
    teacache: TeaCacheConfig | None = None
    color_correction_strength: float = 1.0
    batched_guidance: bool = True  # False: the passes one at a time, as the original (reference schedule)


@dataclass
class ClipOutput:
    plan: ClipPlan
    latent: torch.Tensor  # [16, T, h, w] final latent
    frames: torch.Tensor  # [1, 3, n, H, W] the clip's new frames (after colour correction), fp32
    teacache: TeaCache | None


def generate_video_clips(
    transformer,
    vae,
    image_encoder,
    conditioning: VideoConditioning,
    clips: list[ClipPlan],
    settings: SamplingSettings,
    generator: torch.Generator,
    on_step: Callable[[ClipPlan, int, int], None] | None = None,
) -> Iterator[ClipOutput]:
    device = generator.device  # the pipeline's device (an offloaded transformer's parameters may sit on the CPU)
    reference = conditioning.reference.float()
    height, width = reference.shape[-2:]
    latent_hw = (height // 8, width // 8)
    condition_frames = reference
    motion_frames = clips[1].condition_frames if len(clips) > 1 else 0
    for clip in clips:
        noise = torch.randn(LATENT_CHANNELS, clip.latent_frames, *latent_hw, generator=generator,
                            dtype=torch.float32, device=generator.device).to(device)
        image_features = image_encoder.encode(condition_frames[:, :, -1:].to(device))
        latents = vae.encode(condition_video(condition_frames, clip.frames).to(device))  # [1, 16, T, h, w]
        motion = None if clip.is_first else latents[0, :, : clip.motion_latent_frames]
        mask = frame_mask(clip.frames, clip.condition_frames, latent_hw).to(device)
        guidance_inputs = GuidanceInputs(
            context=conditioning.context,
            negative_context=conditioning.negative_context,
            image_features=image_features,
            audio=clip_audio(conditioning.embeddings, clip).to(device),
            ref_target_masks=conditioning.ref_target_masks.to(device),
        )
        inputs = ClipInputs(noise, torch.cat([mask, latents.to(mask.dtype)], dim=1), guidance_inputs, motion)
        step_callback = (lambda step, steps, clip=clip: on_step(clip, step, steps)) if on_step else None
        latent, cache = sample_clip(transformer, inputs, settings.timesteps, settings.guidance, generator,
                                    settings.teacache, step_callback, settings.batched_guidance)
        video = vae.decode(latent[None]).float()  # [1, 3, F, H, W]
        if settings.color_correction_strength > 0:
            video = match_colors(video, reference.to(video.device), settings.color_correction_strength)
        if not clip.is_last:
            condition_frames = video[:, :, -motion_frames:].cpu()
        yield ClipOutput(clip, latent, video[:, :, clip.keep_from:].cpu(), cache)
