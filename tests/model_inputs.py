"""Random transformer inputs for tests that run guidance passes on the tiny weights."""

from __future__ import annotations

import torch

from model.guidance import GuidanceInputs


def random_guidance_inputs(config, grid: tuple[int, int, int], speakers: int, generator: torch.Generator) -> GuidanceInputs:
    """Prompt, negative prompt, CLIP features and audio windows for a latent grid (T, h, w); person 1 on the
    left half, person 2 on the right."""
    frames, height, width = grid
    masks = torch.zeros(3, height, width)
    masks[0, :, : width // 2], masks[1, :, width // 2 :] = 1, 1
    return GuidanceInputs(
        context=torch.randn(7, config.text_dim, generator=generator),
        negative_context=torch.randn(5, config.text_dim, generator=generator),
        image_features=torch.randn(1, 257, config.image_dim, generator=generator),
        audio=torch.randn(speakers, 4 * (frames - 1) + 1, config.audio_window, config.audio_layers, config.audio_dim,
                          generator=generator),
        ref_target_masks=masks,
    )
