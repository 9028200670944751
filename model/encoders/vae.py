"""Video VAE: Wan 2.1's causal 3-D VAE as diffusers' `AutoencoderKLWan`, with the latent normalisation.

diffusers' VAE does not normalise latents; the transformer works on `(μ − mean) · (1/std)` per
channel (multiplying by the reciprocal, bit-exact with the original), and decoding inverts it.
The posterior mean is used (no sampling); decoding clamps to [−1, 1].

The VAE runs in fp32 like the original (`Precision`) and, like it, leaves torch's TF32 flags as they are: on a
GPU, torch's defaults let cuDNN run the fp32 convolutions in TF32 while cuBLAS matmuls stay true fp32, which is how
the original runs (it never sets them). True fp32 convolutions cost 3.5× the time for ≈ 1e-3 less error: on one
H200 (GPU proof, 2026-12-04) an 81-frame 480p clip took 5.9 s to encode and 10.1 s to decode in true fp32, 1.7 s and
2.8 s with TF32, whose decoded video differs from true fp32 by 1.3e-3 on average (5.3e-3 at most, relative to the
largest value) — 35 s of the default request's three clips. A CPU has no TF32: the golden parity is unaffected.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan

from model.weights.keymaps import TensorRule, original_vae_key_map
from model.weights.streaming import CheckpointFiles, WeightsError, load_into_empty_model


def load_vae_from_original(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> AutoencoderKLWan:
    """Load Wan's `Wan2.1_VAE.pth` (original keys) into `AutoencoderKLWan`."""
    source = CheckpointFiles([Path(path)])
    shapes = source.shapes()
    if "encoder.conv1.weight" not in shapes or "conv1.weight" not in shapes:
        raise WeightsError(f"{path} is not a Wan 2.1 VAE checkpoint (no encoder.conv1 / conv1 weights)")
    base_dim = shapes["encoder.conv1.weight"][0]
    z_dim = shapes["conv1.weight"][0] // 2
    with init_empty_weights():
        vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    rules = {target: TensorRule(src) for src, target in original_vae_key_map(source.keys()).items()}
    load_into_empty_model(vae, source, rules, dtype=dtype, device=device, what=f"VAE {path}")
    return vae.eval()


def load_vae_from_pretrained(folder: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> AutoencoderKLWan:
    return AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype).to(device).eval()


class WanVAE:
    """Encode pixels to normalised latents and back."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def posterior_mean(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [−1, 1] → un-normalised latent mean [B, z, 1 + (F−1)/4, H/8, W/8] (fp32)."""
        video = video.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.encode(video).latent_dist.mode().float()

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        return (mu - self.mean.to(mu.device)) * self.inv_std.to(mu.device)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [−1, 1] → normalised latent (what the transformer sees)."""
        return self.normalize(self.posterior_mean(video))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] → video [B, 3, 1 + 4(T−1), 8h, 8w] clamped to [−1, 1] (fp32)."""
        latents = latents.float()
        raw = latents / self.inv_std.to(latents.device) + self.mean.to(latents.device)
        return self.vae.decode(raw.to(device=self.vae.device, dtype=self.vae.dtype)).sample.float()
