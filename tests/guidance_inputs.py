"""Fixed guidance inputs for the tiny transformer on an 8 × 8 latent grid, shared by the transformer and memory tests."""

import torch

from model.sampling.guidance import GuidanceInputs


def tiny_guidance_inputs(model, speakers: int, generator: torch.Generator) -> GuidanceInputs:
    """Text, image and audio features of the right sizes, with left/right person masks for two speakers."""
    cfg = model.config
    masks = torch.zeros(3, 8, 8)
    masks[0, :, :4], masks[1, :, 4:] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    masks[2, 0] = 1
    masks[0, 0], masks[1, 0] = 0, 0
    return GuidanceInputs(
        context=torch.randn(7, cfg.text_dim, generator=generator),
        negative_context=torch.randn(5, cfg.text_dim, generator=generator),
        image_features=torch.randn(1, 257, cfg.image_dim, generator=generator),
        audio=torch.randn(speakers, 9, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, generator=generator),
        ref_target_masks=masks if speakers == 2 else torch.ones(3, 8, 8),
    )
