"""MultiTalk's audio projector: per-video-frame wav2vec2 windows → audio context tokens per latent frame.

The VAE compresses 4 video frames into one latent frame (the first latent frame holds video frame 0
alone), so the audio of a latent frame is a longer window than the audio of one video frame:
latent frame 0 uses the 5-frame window of video frame 0; latent frame j ≥ 1 uses the contiguous
8-frame run of video frames 4j−5 … 4j+2, built from the windows of its 4 video frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def group_windows_by_latent_frame(windows: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame windows into the first latent frame's and the later latent frames' windows.

    windows: [N, F, W, L, C] (N streams, F = 1 + vae_scale·(T−1) video frames, W-frame windows).
    Returns ([N, 1, W, L, C], [N, T−1, W + vae_scale − 1, L, C]).
    """
    n, frames, window = windows.shape[:3]
    if (frames - 1) % vae_scale:
        raise ValueError(f"audio covers {frames} video frames; need 1 + {vae_scale}·k")
    middle = window // 2
    first = windows[:, :1]
    later = windows[:, 1:].unflatten(1, ((frames - 1) // vae_scale, vae_scale))  # [N, T-1, 4, W, L, C]
    # Window positions 0..middle of the group's first frame, the centres of the middle frames and
    # positions middle..W-1 of the last frame: one contiguous run of video frames.
    head = later[:, :, 0, : middle + 1]
    centre = later[:, :, 1:-1, middle]
    tail = later[:, :, -1, middle:]
    return first, torch.cat([head, centre, tail], dim=2)


class MultiTalkAudioProjModel(nn.Module):
    """Projects audio windows to `context_tokens` tokens of `output_dim` per latent frame.

    Parameter names match the original `AudioProjModel` (`proj1`, `proj1_vf`, `proj2`, `proj3`, `norm`).
    """

    def __init__(
        self,
        window: int = 5,
        vae_scale: int = 4,
        audio_layers: int = 12,
        audio_dim: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
    ):
        super().__init__()
        self.vae_scale = vae_scale
        self.context_tokens = context_tokens
        self.output_dim = output_dim
        later_window = window + vae_scale - 1
        self.proj1 = nn.Linear(window * audio_layers * audio_dim, intermediate_dim)
        self.proj1_vf = nn.Linear(later_window * audio_layers * audio_dim, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """windows: [N, F, W, L, C] per-video-frame audio windows → tokens [N, T, context_tokens, output_dim]."""
        first, later = group_windows_by_latent_frame(windows, self.vae_scale)
        first = torch.relu(self.proj1(first.flatten(2)))  # [N, 1, inter]
        later = torch.relu(self.proj1_vf(later.flatten(2)))  # [N, T-1, inter]
        hidden = torch.relu(self.proj2(torch.cat([first, later], dim=1)))  # [N, T, inter]
        tokens = self.proj3(hidden).unflatten(-1, (self.context_tokens, self.output_dim))
        return self.norm(tokens)
