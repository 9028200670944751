"""Colour correction of generated clips towards the reference image (Lab mean/std transfer).

The original pulls every decoded clip to the CPU and runs scikit-image's `rgb2lab` / `lab2rgb`
frame by frame; this is the same math in torch, batched over frames, on the clip's own device.
The conversions follow scikit-image's constants and branches exactly (sRGB, D65, 2° observer,
including how `lab2rgb` zeroes negative z and clips) and run in float64: they equal scikit-image
fed float64 to ~1e-13. The original feeds it float32 clips, so scikit-image computes in float32 and
its whole-frame float32 sums are off by ~1e-5 relative; its results therefore differ from the exact
ones (and from these) by up to ~6e-4 on [−1, 1] — about 1% of the final uint8 values by one level.
"""

from __future__ import annotations

import torch

# sRGB → XYZ (D65) as scikit-image defines it; the inverse is taken in float64 like its `linalg.inv`.
_XYZ_FROM_RGB = torch.tensor(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)

# Frames per pass such that one float64 [n, H, W, 3] temporary stays near 200 MB (about ten are
# alive at once); frames are independent, so splitting the clip changes nothing numerically.
_PIXELS_PER_CHUNK = 1 << 23


def _rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] sRGB in [0, 1] → CIE Lab, as `skimage.color.rgb2lab`."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.to(rgb.device).T / _D65_WHITE.to(rgb.device)
    f = torch.where(xyz > 0.008856, xyz.pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-1)


def _lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """[..., 3] CIE Lab → sRGB clipped to [0, 1], as `skimage.color.lab2rgb` (negative z → 0)."""
    lightness, a, b = lab.unbind(-1)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0.0)], dim=-1)
    xyz = torch.where(f > 0.2068966, f.pow(3.0), (f - 16.0 / 116.0) / 7.787) * _D65_WHITE.to(lab.device)
    linear = xyz @ _RGB_FROM_XYZ.to(lab.device).T
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.pow(1.0 / 2.4) - 0.055, linear * 12.92)
    return rgb.clamp(0.0, 1.0)


def _channel_stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H, W, 3] → per-image, per-channel mean and population std, each [N, 1, 1, 3].

    A channel whose values are all equal gets a std of exactly 0. A summed mean of identical values
    is usually off in its last bits, so the std would be ~1e-12 instead and the transfer would
    give μ_ref ± σ_ref (as the original does for most flat frames other than black) rather than
    the μ_ref its `σ = 0` case intends.
    """
    mean = lab.mean(dim=(1, 2), keepdim=True)
    std = lab.std(dim=(1, 2), keepdim=True, correction=0)
    flat = lab.amax(dim=(1, 2), keepdim=True) == lab.amin(dim=(1, 2), keepdim=True)
    return mean, std.masked_fill(flat, 0.0)


def _to_unit_rgb(frames: torch.Tensor) -> torch.Tensor:
    """[3, N, H, W] in [−1, 1] → float64 [N, H, W, 3] in [0, 1] (clipped)."""
    return ((frames.permute(1, 2, 3, 0).double() + 1.0) / 2.0).clamp(0.0, 1.0)


def match_colors(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Pull each frame's Lab statistics towards the reference image's, blended by `strength`.

    video [1, 3, T, H, W] and reference [1, 3, 1, H, W], both in [−1, 1] → [1, 3, T, H, W] in
    [−1, 1], same dtype and device as `video`. Per frame and Lab channel:
    `(x − μ_frame)·σ_ref/σ_frame + μ_ref` (the channel becomes μ_ref where σ_frame = 0), back to
    sRGB, clipped, then `(1 − s)·frame + s·matched`. strength 0 returns `video` itself.
    """
    if video.dim() != 5 or video.shape[:2] != (1, 3) or reference.dim() != 5 or reference.shape[:3] != (1, 3, 1):
        raise ValueError(f"expected video [1, 3, T, H, W] and reference [1, 3, 1, H, W], "
                         f"got {tuple(video.shape)} and {tuple(reference.shape)}")  # fmt: skip
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour-correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return video
    ref_mean, ref_std = _channel_stats(_rgb_to_lab(_to_unit_rgb(reference[0].to(video.device))))  # [1, 1, 1, 3]
    frames_per_chunk = max(1, _PIXELS_PER_CHUNK // (video.shape[-2] * video.shape[-1]))
    chunks = []
    for chunk in video[0].split(frames_per_chunk, dim=1):  # [3, n, H, W]
        src = _to_unit_rgb(chunk)  # [n, H, W, 3]
        lab = _rgb_to_lab(src)
        mean, std = _channel_stats(lab)
        scaled = (lab - mean) * (ref_std / std) + ref_mean
        matched = _lab_to_rgb(torch.where(std == 0.0, ref_mean, scaled))
        blended = (1.0 - strength) * src + strength * matched
        chunks.append((blended * 2.0 - 1.0).permute(3, 0, 1, 2).to(video.dtype))
    return torch.cat(chunks, dim=1).unsqueeze(0)
