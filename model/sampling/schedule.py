"""The sampler's timestep schedule, exactly as the original builds it.

`linspace(1000, 1, steps)` in float32 with 0 appended, each value passed through the shift transform
`t' = 1000 · s·u / (1 + (s − 1)·u)` with `u = t/1000`, all in float32 torch arithmetic. The transformer
receives `t'`; the flow-matching noise level is `σ = t'/1000`. (diffusers' FlowMatchEulerDiscreteScheduler
computes the same curve in float64 then casts, which is not bit-identical, and the long-video
motion-frame injection needs σ of the next step anyway — so the schedule is a plain tensor here.)
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000

# Default shift per resolution (the original's --sample_shift default for multitalk-480 / -720).
DEFAULT_SHIFT = {"480p": 7.0, "720p": 11.0}


def shift_timesteps(t: torch.Tensor, shift: float, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    u = t / num_timesteps
    return shift * u / (1 + (shift - 1) * u) * num_timesteps


def sampling_timesteps(steps: int, shift: float, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """[steps + 1] float32 timesteps t'_0 = 1000 > … > t'_steps = 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    base = np.append(np.linspace(num_timesteps, 1, steps, dtype=np.float32), np.float32(0.0))
    return shift_timesteps(torch.from_numpy(base), shift, num_timesteps)


def noise_levels(timesteps: torch.Tensor, num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """σ_i = t'_i / 1000, the weight of the noise in x_σ = (1 − σ)·x0 + σ·ε."""
    return timesteps.float() / num_timesteps
