"""Write example inputs for `multitalk generate`: a two-person image and two short speech-like tracks.

The project ships no media files; these are drawn and synthesised from a seed, so a fresh checkout can
run the whole pipeline (with the tiny weights the result is noise-like, but every stage runs for real).

    python scripts/make_example_inputs.py examples/
"""

from __future__ import annotations

import argparse
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_RATE = 16000


def _person(draw: ImageDraw.ImageDraw, cx: int, skin: tuple, shirt: tuple, height: int) -> None:
    head = height // 5
    draw.rounded_rectangle((cx - 2 * head, 2 * head + head // 2, cx + 2 * head, height), radius=head // 2, fill=shirt)
    draw.ellipse((cx - head, head, cx + head, 3 * head), fill=skin)
    eye = head // 6
    for dx in (-head // 2, head // 2):
        draw.ellipse((cx + dx - eye, 2 * head - head // 3 - eye, cx + dx + eye, 2 * head - head // 3 + eye), fill=(40, 30, 30))
    draw.arc((cx - head // 2, 2 * head, cx + head // 2, 2 * head + head // 2), 20, 160, fill=(120, 40, 40), width=max(2, eye // 2))


def draw_two_people(path: Path, width: int = 1280, height: int = 720) -> Path:
    image = Image.new("RGB", (width, height), (176, 196, 222))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(height * 0.8), width, height), fill=(120, 100, 80))
    _person(draw, width // 4, (236, 200, 170), (60, 90, 160), height)
    _person(draw, 3 * width // 4, (200, 150, 120), (170, 60, 60), height)
    image.save(path)
    return path


def synth_speech(path: Path, seconds: float, pitch_hz: float, seed: int) -> Path:
    """Voiced, syllable-rate amplitude-modulated harmonics with pauses: enough like speech to drive wav2vec2."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    vibrato = pitch_hz * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(vibrato) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.35 * t + rng.uniform(0, 6)) > -0.6).astype(float)
    signal = 0.25 * voice * syllables * pauses + 0.003 * rng.standard_normal(t.size)
    pcm = (np.clip(signal, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(pcm.tobytes())
    return path


def write_example_inputs(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "image": draw_two_people(folder / "two_people.png"),
        "audio1": synth_speech(folder / "speaker1.wav", 4.0, 120.0, seed=1),
        "audio2": synth_speech(folder / "speaker2.wav", 3.5, 210.0, seed=2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write two_people.png, speaker1.wav, speaker2.wav into")
    for name, path in write_example_inputs(parser.parse_args().out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
