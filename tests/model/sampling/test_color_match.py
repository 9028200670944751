"""Colour correction equals the original's per-frame scikit-image recipe, batched in torch.

The reference below restates the recipe with `skimage.color.rgb2lab` / `lab2rgb` one frame at a
time. scikit-image computes in the dtype it is given: fed float64 it is the exact answer the torch
port reproduces to rounding; fed float32 (what the original does) it carries its own float32
rounding noise, which bounds how close any port can get to the original.
"""

import warnings

import numpy as np
import pytest
import torch
from skimage import color

from model.sampling import color_match
from model.sampling.color_match import match_colors

T, H, W = 5, 48, 64


def skimage_reference(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-frame Lab mean/std transfer with scikit-image, in the inputs' dtype: [1, 3, T, H, W]."""
    frames = np.clip((video[0].permute(1, 2, 3, 0).numpy() + 1) / 2, 0, 1)  # [T, H, W, 3]
    ref_lab = color.rgb2lab(np.clip((reference[0, :, 0].permute(1, 2, 0).numpy() + 1) / 2, 0, 1))
    ref_mean, ref_std = ref_lab.mean(axis=(0, 1)), ref_lab.std(axis=(0, 1))
    out = []
    for frame in frames:
        lab = color.rgb2lab(frame)
        mean, std = lab.mean(axis=(0, 1)), lab.std(axis=(0, 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            matched = np.where(std == 0, ref_mean, (lab - mean) * (ref_std / std) + ref_mean)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lab2rgb warns when it zeroes negative z, as intended
            rgb = np.clip(color.lab2rgb(matched), 0, 1)
        out.append((1 - strength) * frame + strength * rgb)
    return torch.from_numpy(np.stack(out) * 2 - 1).permute(3, 0, 1, 2).unsqueeze(0)


def random_inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A tinted video slightly beyond [−1, 1] (exercising the clips) and a differently tinted reference."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(1, 3, T, H, W, generator=g, dtype=torch.float64) * 1.8 - 0.95
    video[:, 0] = video[:, 0] * 0.5 + 0.4
    reference = torch.rand(1, 3, 1, H, W, generator=g, dtype=torch.float64) * 2.1 - 1.05
    reference[:, 2] = reference[:, 2] * 0.3 - 0.5
    return video.to(dtype), reference.to(dtype)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_float64_matches_skimage_to_rounding(strength):
    video, reference = random_inputs(0, torch.float64)
    out = match_colors(video, reference, strength)
    assert out.dtype == torch.float64 and out.shape == video.shape
    torch.testing.assert_close(out, skimage_reference(video, reference, strength), rtol=0, atol=1e-12)


def test_float32_matches_exact_skimage_and_the_originals_float32_path():
    video, reference = random_inputs(1, torch.float32)
    out = match_colors(video, reference, 1.0)
    assert out.dtype == torch.float32
    exact = skimage_reference(video.double(), reference.double(), 1.0)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-6)  # float32 output rounding only
    original = skimage_reference(video, reference, 1.0)  # scikit-image in float32, as the original runs it
    torch.testing.assert_close(out, original.float(), rtol=0, atol=1e-4)


def test_flat_frame_becomes_the_reference_mean_colour():
    video, reference = random_inputs(2, torch.float64)
    video[:, :, 1] = -1.0  # black: numpy's std of each Lab channel is exactly 0
    video[:, :, 3] = torch.tensor([0.2, -0.3, 0.6], dtype=torch.float64).view(1, 3, 1, 1)
    out = match_colors(video, reference, 1.0)
    agree = [0, 1, 2, 4]
    expected = skimage_reference(video, reference, 1.0)
    torch.testing.assert_close(out[:, :, agree], expected[:, :, agree], rtol=0, atol=1e-12)
    # Frame 3 is flat too, but numpy's mean of its identical values is off in the last bits, so its
    # std is ~1e-12 rather than 0 and the literal recipe gives μ_ref ± σ_ref; the port treats every
    # flat channel as σ = 0, which is what the recipe means.
    assert np.all(color.rgb2lab((video[0, :, 3].permute(1, 2, 0).numpy() + 1) / 2).std(axis=(0, 1)) > 0)
    ref_lab = color.rgb2lab(np.clip((reference[0, :, 0].permute(1, 2, 0).numpy() + 1) / 2, 0, 1))
    mean_colour = torch.from_numpy(color.lab2rgb(ref_lab.mean(axis=(0, 1))) * 2 - 1)
    for t in (1, 3):
        torch.testing.assert_close(out[0, :, t], mean_colour.view(3, 1, 1).expand(3, H, W), rtol=0, atol=1e-12)


def test_chunking_over_frames_changes_nothing(monkeypatch):
    video, reference = random_inputs(3, torch.float32)
    whole = match_colors(video, reference, 0.7)
    monkeypatch.setattr(color_match, "_PIXELS_PER_CHUNK", 2 * H * W)  # chunks of 2, 2, 1 frames
    assert torch.equal(match_colors(video, reference, 0.7), whole)


def test_strength_zero_returns_the_input_and_invalid_arguments_raise():
    video, reference = random_inputs(4, torch.float32)
    assert match_colors(video, reference, 0.0) is video
    for strength in (-0.1, 1.5):
        with pytest.raises(ValueError, match="strength"):
            match_colors(video, reference, strength)
    with pytest.raises(ValueError, match="expected video"):
        match_colors(video[0], reference, 1.0)
    with pytest.raises(ValueError, match="expected video"):
        match_colors(video, video, 1.0)
