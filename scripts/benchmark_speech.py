"""Time speech synthesis (the text endpoints' first step) for a text of about 10 seconds, on a real-size Kokoro-82M.

No checkpoint can be downloaded here, so the model is Kokoro-82M's published structure (`tools/real_size.KOKORO_82M`)
with random weights (`write_random_kokoro`, whose duration head speaks at a real pace, ≈ 13 phonemes a second, so
the decoder makes as many seconds of audio as the real model does for this text, which is what its cost depends
on), loaded through the product's `SpeechSynthesizer` like the real files. Prints one JSON object: G2P and model times per run, seconds of speech, and the
real-time factor.

    python scripts/benchmark_speech.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.speech.synthesis import SAMPLE_RATE, SpeechSynthesizer  # noqa: E402
from model.weights.tiny import write_random_kokoro  # noqa: E402
from tools.real_size import KOKORO_82M, KOKORO_82M_TOKENS  # noqa: E402

# About 10 s at a normal speaking rate (≈ 150 words a minute): 25 words, 133 characters.
TEXT = ("Spend more time with people who make you feel alive, and less with things that drain your soul. "
        "We will meet again at the old bridge.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        write_random_kokoro(Path(folder), KOKORO_82M, n_token=KOKORO_82M_TOKENS)
        started = time.perf_counter()
        synthesizer = SpeechSynthesizer(Path(folder), args.device)
        load_s = time.perf_counter() - started
        parameters = sum(p.numel() for p in synthesizer.model.parameters())
        started = time.perf_counter()
        phonemes = synthesizer.phonemes(TEXT, british=False)  # the first call also builds the G2P
        g2p_first_s = time.perf_counter() - started
        runs = []
        for _ in range(args.repeats + 1):  # the first run warms up
            started = time.perf_counter()
            audio = synthesizer.synthesize(TEXT, "Sarah", "text_input", seed=0)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - started)
    seconds = len(audio) / SAMPLE_RATE
    median = statistics.median(runs[1:])
    print(json.dumps({
        "device": args.device, "threads": torch.get_num_threads(), "parameters": parameters,
        "text_chars": len(TEXT), "phonemes": len(phonemes), "speech_s": round(seconds, 2),
        "load_s": round(load_s, 2), "g2p_first_call_s": round(g2p_first_s, 2),
        "first_run_s": round(runs[0], 3), "synthesis_s": [round(r, 3) for r in runs[1:]],
        "median_s": round(median, 3), "realtime_factor": round(seconds / median, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
