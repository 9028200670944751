"""Audio encoder: wav2vec2 (chinese-wav2vec2-base) features at the video's 25 fps.

MultiTalk resamples the conv feature encoder's ~50 Hz output linearly to exactly one step per video
frame *before* the transformer layers, so the transformer itself runs at 25 Hz. transformers has no
argument for that; a forward hook on `feature_extractor` does the resampling inside an otherwise
normal `Wav2Vec2Model` forward (transformers 5 only collects hidden states at the top level).

wav2vec2 runs in fp32 as in the original, whose numbers are the parity reference, so its forward runs
with TF32 off (`model.runtime.tf32`): cuDNN would otherwise run the conv feature encoder in TF32 on
Ampere and newer GPUs, ≈ 1e-3 relative error against true fp32. It runs once per request's audio track,
so the cost is small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from model.contract.fields import VIDEO_FPS
from model.media.audio_input import SAMPLE_RATE
from model.runtime.tf32 import tf32_disabled


@dataclass
class AudioFeatures:
    embedding: torch.Tensor  # [L, layers, hidden]: transformer layer outputs per video frame (fp32, CPU)
    input_values: torch.Tensor  # [N] normalised waveform fed to the model
    conv_features: torch.Tensor  # [C, L_conv] conv encoder output before resampling
    hidden_states: torch.Tensor  # [layers + 1, L, hidden]: encoder input, then every layer


def video_frames_for(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """Number of whole video frames the audio covers: int(seconds · fps), as the original."""
    return int(num_samples / sample_rate * fps)


class Wav2Vec2AudioEncoder:
    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor):
        self.model = model.eval()
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(cls, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "Wav2Vec2AudioEncoder":
        model = Wav2Vec2Model.from_pretrained(folder, dtype=dtype).to(device)
        return cls(model, Wav2Vec2FeatureExtractor.from_pretrained(folder))

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> AudioFeatures:
        """Mono waveform at 16 kHz → features with one row per 25 fps video frame (true fp32: no TF32)."""
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"wav2vec2 needs {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
        frames = video_frames_for(len(samples))
        if frames < 1:
            raise ValueError(f"audio of {len(samples)} samples is shorter than one video frame")
        values = np.squeeze(self.feature_extractor(samples, sampling_rate=SAMPLE_RATE).input_values)
        input_values = torch.from_numpy(np.asarray(values)).float()
        captured: dict[str, torch.Tensor] = {}

        def resample_to_video_frames(_module, _inputs, conv_out: torch.Tensor) -> torch.Tensor:
            captured["conv"] = conv_out
            return F.interpolate(conv_out, size=frames, mode="linear", align_corners=True)

        hook = self.model.feature_extractor.register_forward_hook(resample_to_video_frames)
        try:
            param = next(self.model.parameters())
            with tf32_disabled():
                out = self.model(input_values[None].to(device=param.device, dtype=param.dtype),
                                 output_hidden_states=True)
        finally:
            hook.remove()
        hidden = torch.stack(out.hidden_states, dim=0)[:, 0].float().cpu()  # [layers + 1, L, hidden]
        return AudioFeatures(
            embedding=hidden[1:].transpose(0, 1).contiguous(),
            input_values=input_values,
            conv_features=captured["conv"][0].float().cpu(),
            hidden_states=hidden,
        )
