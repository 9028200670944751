"""MultiTalk's classifier-free guidance, with its passes batched into one transformer forward.

Three passes per step (text scale ≠ 1): `cond` (prompt, real audio), `drop_text` (negative prompt,
real audio), `uncond` (negative prompt, one all-zero audio stream — which takes the 1-speaker path
even in a 2-speaker video):
    v = v_uncond + s_text·(v_cond − v_drop_text) + s_audio·(v_drop_text − v_uncond)
Two passes (text scale = 1, the distilled-LoRA recipes): `cond` and `drop_audio` (prompt, zero audio):
    v = v_drop_audio + s_audio·(v_cond − v_drop_audio)
The original runs the passes one after another at batch 1; here they are one batch whose items
differ in text context, audio and speaker count, which gives the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configs import TEXT_LEN


def uses_text_guidance(text_scale: float) -> bool:
    """The original switches to 2 passes when the text scale is 1 (checked with isclose)."""
    return not math.isclose(text_scale, 1.0)


@dataclass
class GuidanceInputs:
    """Per-request conditioning shared by every step (one sample, unbatched shapes)."""

    context: torch.Tensor  # [L, text_dim] prompt features (trimmed)
    negative_context: torch.Tensor  # [L', text_dim] negative-prompt features (trimmed)
    image_features: torch.Tensor  # [1, 257, image_dim]
    audio: torch.Tensor  # [P, F, window, layers, dim] audio windows of the clip
    ref_target_masks: torch.Tensor  # [3, h, w]

    def pass_names(self, text_scale: float) -> tuple[str, ...]:
        return ("cond", "drop_text", "uncond") if uses_text_guidance(text_scale) else ("cond", "drop_audio")

    def transformer_kwargs(self, text_scale: float, dtype: torch.dtype = torch.float32) -> dict:
        """Everything but latents and timestep for one batched forward of all guidance passes.

        Built once per clip (the conditioning does not change between steps), in the transformer's dtype.
        """
        speakers = self.audio.shape[0]
        silent = torch.zeros_like(self.audio)  # the null-audio pass uses the first (zero) stream only
        prompt = F.pad(self.context, (0, 0, 0, TEXT_LEN - self.context.shape[0]))
        negative = F.pad(self.negative_context, (0, 0, 0, TEXT_LEN - self.negative_context.shape[0]))
        if uses_text_guidance(text_scale):
            texts, audio, counts = [prompt, negative, negative], [self.audio, self.audio, silent], [speakers, speakers, 1]
        else:
            texts, audio, counts = [prompt, prompt], [self.audio, silent], [speakers, 1]
        batch = len(texts)
        return {
            "encoder_hidden_states": torch.stack(texts).to(dtype),
            "encoder_hidden_states_image": self.image_features.expand(batch, -1, -1).to(dtype),
            "audio_embeds": torch.stack(audio).to(dtype),
            "num_speakers": counts,
            "ref_target_masks": self.ref_target_masks,
        }


def combine_guidance(predictions: torch.Tensor, text_scale: float, audio_scale: float) -> torch.Tensor:
    """[passes, ...] predictions in `pass_names` order → the guided velocity [...]."""
    if uses_text_guidance(text_scale):
        cond, drop_text, uncond = predictions.unbind(0)
        return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
    cond, drop_audio = predictions.unbind(0)
    return drop_audio + audio_scale * (cond - drop_audio)


@torch.no_grad()
def guided_velocity(transformer, latent_input: torch.Tensor, timestep: torch.Tensor, batch_kwargs: dict,
                    text_scale: float, audio_scale: float) -> torch.Tensor:
    """One step's guided prediction: latent_input [1, 36, T, h, w], timestep [1] → [1, 16, T, h, w].

    batch_kwargs: `GuidanceInputs.transformer_kwargs(text_scale, transformer.dtype)`, built once per clip.
    """
    batch = len(batch_kwargs["num_speakers"])
    latents = latent_input.to(transformer.dtype).expand(batch, -1, -1, -1, -1)
    predictions = transformer(latents, timestep.expand(batch), **batch_kwargs).sample
    return combine_guidance(predictions, text_scale, audio_scale)
