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

from model.network.configs import TEXT_LEN


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


def random_guidance_inputs(config, grid: tuple[int, int, int], speakers: int,
                           generator: torch.Generator | None = None, device: torch.device | str | None = None
                           ) -> GuidanceInputs:
    """Conditioning of the right shapes with random values for a latent grid (T, h, w): the compile warm-up,
    benchmarks and tests. Person 1 is the left half, person 2 the right; the draws come from `generator`
    (on its device) or the global generator on `device`. `config`: the transformer's."""
    frames, height, width = grid
    device = generator.device if generator is not None else device

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    masks = torch.zeros(3, height, width, device=device)
    masks[0, :, : width // 2], masks[1, :, width // 2 :] = 1, 1
    video_frames = config.vae_scale * (frames - 1) + 1
    return GuidanceInputs(
        context=random(7, config.text_dim),
        negative_context=random(5, config.text_dim),
        image_features=random(1, 257, config.image_dim),
        audio=random(speakers, video_frames, config.audio_window, config.audio_layers, config.audio_dim),
        ref_target_masks=masks,
    )


def combine_guidance(predictions: torch.Tensor, text_scale: float, audio_scale: float) -> torch.Tensor:
    """Vanilla CFG: [passes, ...] predictions in `pass_names` order → the guided velocity [...]."""
    if uses_text_guidance(text_scale):
        cond, drop_text, uncond = predictions.unbind(0)
        return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)
    cond, drop_audio = predictions.unbind(0)
    return drop_audio + audio_scale * (cond - drop_audio)


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance scales and APG options (defaults: the original's CLI)."""

    text_scale: float = 5.0
    audio_scale: float = 4.0
    use_apg: bool = False
    apg_momentum: float = -0.75
    apg_norm_threshold: float = 55.0

    @property
    def pass_names(self) -> tuple[str, ...]:
        return ("cond", "drop_text", "uncond") if uses_text_guidance(self.text_scale) else ("cond", "drop_audio")


class MomentumBuffer:
    """APG's running average of a guidance difference: running = Δ + momentum·running (0 at clip start)."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.running: torch.Tensor | float = 0.0

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.running = diff + self.momentum * self.running
        return self.running


def adaptive_projected_guidance(diff: torch.Tensor, pred_cond: torch.Tensor, buffer: MomentumBuffer,
                                norm_threshold: float, eta: float = 0.0) -> torch.Tensor:
    """APG (arXiv 2410.02416) on [B, C, T, H, W]: momentum, norm clamp, then drop the part parallel to v_cond.

    Norms and projections run over C, T, H, W per batch item; the projection in float64, as the original.
    """
    diff = buffer.update(diff)
    dims = [-1, -2, -3, -4]
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff), norm_threshold / norm)
    unit = F.normalize(pred_cond.double(), dim=dims)
    diff64 = diff.double()
    parallel = (diff64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = (diff64 - parallel).to(diff.dtype)
    return orthogonal + eta * parallel.to(diff.dtype)


class GuidanceCombiner:
    """Turns one step's pass predictions into the guided velocity; create one per clip (APG momentum resets)."""

    def __init__(self, config: GuidanceConfig):
        self.config = config
        self.text_buffer = MomentumBuffer(config.apg_momentum)
        self.audio_buffer = MomentumBuffer(config.apg_momentum)

    def __call__(self, predictions: torch.Tensor) -> torch.Tensor:
        """[passes, C, T, H, W] in `config.pass_names` order → [1, C, T, H, W]."""
        cfg = self.config
        if not cfg.use_apg:
            return combine_guidance(predictions, cfg.text_scale, cfg.audio_scale)[None]
        preds = predictions[:, None]  # [passes, 1, C, T, H, W]: APG norms are per sample
        threshold = cfg.apg_norm_threshold
        if uses_text_guidance(cfg.text_scale):
            cond, drop_text, uncond = preds.unbind(0)
            text = adaptive_projected_guidance(cond - drop_text, cond, self.text_buffer, threshold)
            audio = adaptive_projected_guidance(drop_text - uncond, cond, self.audio_buffer, threshold)
            return cond + (cfg.text_scale - 1) * text + (cfg.audio_scale - 1) * audio
        cond, drop_audio = preds.unbind(0)
        audio = adaptive_projected_guidance(cond - drop_audio, cond, self.audio_buffer, threshold)
        return cond + (cfg.audio_scale - 1) * audio


@torch.no_grad()
def guided_velocity(transformer, latent_input: torch.Tensor, timestep: torch.Tensor, batch_kwargs: dict,
                    combiner: GuidanceCombiner, block_cache=None, batched: bool = True) -> torch.Tensor:
    """One step's guided prediction: latent_input [1, 36, T, h, w], timestep [1] → [1, 16, T, h, w].

    batch_kwargs: `GuidanceInputs.transformer_kwargs(text_scale, transformer.dtype)`, built once per clip.
    batched=False runs the passes one after another at batch 1, as the original does (the reference schedule).
    """
    passes = len(batch_kwargs["num_speakers"])
    latents = latent_input.to(transformer.dtype)
    if batched:
        predictions = transformer(latents.expand(passes, -1, -1, -1, -1), timestep.expand(passes), **batch_kwargs,
                                  block_cache=block_cache).sample
    elif block_cache is not None:
        raise ValueError("TeaCache keeps one state per guidance branch and needs the batched passes")
    else:
        predictions = torch.cat([transformer(latents, timestep, **single_pass_kwargs(batch_kwargs, i)).sample
                                 for i in range(passes)])
    return combiner(predictions)


def single_pass_kwargs(batch_kwargs: dict, index: int) -> dict:
    """The transformer inputs of guidance pass `index` alone (batch 1, only the streams it uses)."""
    speakers = batch_kwargs["num_speakers"][index]
    return {
        "encoder_hidden_states": batch_kwargs["encoder_hidden_states"][index : index + 1],
        "encoder_hidden_states_image": batch_kwargs["encoder_hidden_states_image"][index : index + 1],
        "audio_embeds": batch_kwargs["audio_embeds"][index : index + 1, :speakers],
        "num_speakers": [speakers],
        "ref_target_masks": batch_kwargs["ref_target_masks"],
    }
