"""wav2vec2 runs its fp32 convolutions and matmuls without TF32 and gives the process's flags back afterwards; the
Wan VAE runs under the process's flags, as the original does (torch's defaults on a GPU: TF32 convolutions, true
fp32 matmuls). A CPU has no TF32, so the flags are recorded by hooks on the models' own layers while they run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.encoders.audio_encoder import Wav2Vec2AudioEncoder
from model.encoders.vae import WanVAE, load_vae_from_original
from model.runtime.tf32 import tf32_disabled
from model.weights.layout import find_layout


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_flags(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture
def tf32_allowed():
    """Both flags on (cuDNN's default; matmul as a process that opted in would have it), put back after."""
    before = _flags()
    _set_flags(True, True)
    yield
    _set_flags(*before)


@pytest.fixture(scope="module")
def layout(tiny_weights):
    return find_layout(tiny_weights["multitalk"])


def _record_flags(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, list], list]:
    """Forward hooks that note the flags each time one of `modules` runs; returns (records, handles)."""
    seen: dict[str, list] = {name: [] for name in modules}
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: seen[name].append(_flags()))
               for name, module in modules.items()]
    return seen, handles


def test_wav2vec2_encodes_without_tf32(layout, tf32_allowed):
    encoder = Wav2Vec2AudioEncoder.from_pretrained(layout.audio_encoder)
    seen, handles = _record_flags({"conv": encoder.model.feature_extractor.conv_layers[0].conv,
                                   "matmul": encoder.model.encoder.layers[0].attention.q_proj})
    try:
        encoder.encode(np.random.default_rng(0).standard_normal(16000).astype(np.float32))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == {"conv": [(False, False)], "matmul": [(False, False)]}
    assert _flags() == (True, True), "restored after the call"


def test_the_vae_runs_under_torchs_default_tf32_flags_as_the_original_on_a_gpu(layout):
    """torch's defaults: cuDNN may use TF32 for fp32 convolutions, cuBLAS may not for matmuls. The original never
    changes them, so its VAE convolutions run in TF32 on a GPU; the VAE here must not turn that off (3.5× slower on
    an H200, for ≈ 1e-3 of error the original has too)."""
    before = _flags()
    _set_flags(False, True)  # torch's defaults
    vae = WanVAE(load_vae_from_original(layout.vae, torch.float32))
    seen, handles = _record_flags({"encoder conv": vae.vae.encoder.conv_in, "decoder conv": vae.vae.decoder.conv_in})
    try:
        vae.decode(vae.encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1))
    finally:
        for handle in handles:
            handle.remove()
        _set_flags(*before)
    assert seen["encoder conv"] and seen["decoder conv"], "both convolutions ran"
    assert set(seen["encoder conv"]) == set(seen["decoder conv"]) == {(False, True)}


def test_the_outermost_scope_restores_even_on_an_error(tf32_allowed):
    """Scopes overlap when embedded workers (threads) encode at once: only the last to leave restores."""
    with pytest.raises(RuntimeError), tf32_disabled():
        with tf32_disabled():
            pass
        assert _flags() == (False, False), "an inner scope leaving does not restore"
        raise RuntimeError("a failing encode")
    assert _flags() == (True, True)
