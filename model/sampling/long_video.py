"""Long video as the original streams it: overlapping clips that carry motion frames.

A video of N frames is made of clips of F frames (81 by default). Clip 1 is conditioned on the reference
image; every later clip on the last `motion` (25) decoded frames of the previous one and adds F − motion
new frames, so k clips give F + (k − 1)·(F − motion) frames, cut to N. Audio rows (one per 25 fps video
frame) follow the same timeline: clip c covers rows [c·stride, c·stride + F).

Fixes to the original (spec §13): the output always has exactly N frames (the caller pads audio with
silence up to the video length, so audio is never the limit and nothing is trimmed by a person's
padding length); N < F uses one shorter clip of the smallest valid length 4k + 1 ≥ N instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from model.network.configs import VAE_TEMPORAL_SCALE

CLIP_FRAMES = 81
MOTION_FRAMES = 25
AUDIO_WINDOW = 5  # audio rows per video frame: offsets −2..+2


@dataclass(frozen=True)
class ClipPlan:
    index: int
    start: int  # first audio row / absolute video frame of the clip
    frames: int  # F, a multiple of 4 plus 1
    condition_frames: int  # pixel frames given as conditioning: 1 (reference image) or `motion`
    keep_from: int  # decoded frames before this index repeat the previous clip and are dropped
    is_last: bool

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL_SCALE + 1

    @property
    def motion_latent_frames(self) -> int:
        """Latent frames that encode the conditioning frames (exact: the VAE is causal)."""
        return 1 + (self.condition_frames - 1) // VAE_TEMPORAL_SCALE


def plan_clips(num_frames: int, clip_frames: int = CLIP_FRAMES, motion_frames: int = MOTION_FRAMES) -> list[ClipPlan]:
    """The clips that produce at least `num_frames` frames (the result is cut to exactly that many)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if (clip_frames - 1) % VAE_TEMPORAL_SCALE or not 0 < motion_frames < clip_frames:
        raise ValueError(f"invalid clip length {clip_frames} / motion frames {motion_frames}")
    if num_frames <= clip_frames:
        frames = 1 + VAE_TEMPORAL_SCALE * math.ceil((num_frames - 1) / VAE_TEMPORAL_SCALE)
        return [ClipPlan(0, 0, frames, 1, 0, True)]
    stride = clip_frames - motion_frames
    count = 1 + math.ceil((num_frames - clip_frames) / stride)
    return [ClipPlan(i, i * stride, clip_frames, 1 if i == 0 else motion_frames, 0 if i == 0 else motion_frames,
                     i == count - 1) for i in range(count)]


def extend_for_last_clip(embedding: torch.Tensor, end: int) -> torch.Tensor:
    """The original's padding when a later clip runs past a person's audio rows: append the last
    `end − L + 3` rows in reverse order (a mirror at the end). embedding [L, ...] → [L', ...]."""
    length = embedding.shape[0]
    if end < length:
        return embedding
    miss = min(end - length + 3, length)
    return torch.cat([embedding, embedding[-miss:].flip(0)])


def audio_windows(embedding: torch.Tensor, start: int, frames: int, window: int = AUDIO_WINDOW) -> torch.Tensor:
    """embedding [L, layers, dim] → [frames, window, layers, dim]: rows start+i−2 .. start+i+2, clamped to [0, L−1]."""
    half = window // 2
    index = torch.arange(start, start + frames)[:, None] + torch.arange(-half, half + 1)[None]
    return embedding[index.clamp(0, embedding.shape[0] - 1)]


def clip_audio(embeddings: list[torch.Tensor], clip: ClipPlan) -> torch.Tensor:
    """Every speaker's windows for one clip → [P, F, window, layers, dim].

    As the original, rows past a speaker's end are mirrored for the last clip of a long video and
    clamped to the last row otherwise.
    """
    end = clip.start + clip.frames
    mirror = clip.is_last and not clip.is_first
    rows = [extend_for_last_clip(e, end) if mirror else e for e in embeddings]
    return torch.stack([audio_windows(e, clip.start, clip.frames) for e in rows])


def frame_mask(frames: int, condition_frames: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The 4-channel conditioning mask [1, 4, T, h, w]: 1 where a pixel frame is given.

    Channel q of latent frame j ≥ 1 flags pixel frame 4j − 3 + q; latent frame 0 repeats frame 0's flag.
    """
    mask = torch.ones(1, frames, *latent_hw)
    mask[:, condition_frames:] = 0
    mask = torch.cat([mask[:, :1].repeat_interleave(VAE_TEMPORAL_SCALE, dim=1), mask[:, 1:]], dim=1)
    return mask.view(1, mask.shape[1] // VAE_TEMPORAL_SCALE, VAE_TEMPORAL_SCALE, *latent_hw).transpose(1, 2)


def condition_video(condition: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, 3, n, H, W] conditioning frames → [1, 3, F, H, W] padded with zero (mid-grey) frames."""
    pad = torch.zeros(*condition.shape[:2], frames - condition.shape[2], *condition.shape[3:],
                      dtype=condition.dtype, device=condition.device)
    return torch.cat([condition, pad], dim=2)
