"""Kokoro-82M speech synthesis from its published layout, read in place: text → 24 kHz speech.

The layout of `hexgrad/Kokoro-82M` (what `multitalk weights download` fetches into `Kokoro-82M/`):
`config.json` (sizes and the phoneme vocabulary), `kokoro-v1_0.pth` (the state dicts of the model's five
parts) and `voices/<id>.pt` (one [510, 1, 256] style pack per voice: row n styles an utterance of n + 1
phonemes). The network is `kokoro.KModel`, the package MultiTalk's own TTS mode uses (spec §1.8, §4.6).

Text → phonemes is misaki's English G2P, as in Kokoro's pipeline: its normalisation of numbers,
currencies and abbreviations, its pronouncing dictionaries, and espeak-ng (bundled by `espeakng_loader`)
for words they do not hold. misaki's G2P would download a spaCy tagger model at first use; here spaCy's
rule-based English tokenizer stands in, with the tags the G2P reads for punctuation, currency symbols and
numbers set by rules (`_RULE_TAGS`), so nothing is fetched at run time. What that loses is the
part-of-speech choice between a few heteronyms ("read", "live"), which take their usual pronunciation.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from model.contract.errors import InputError
from model.speech.voices import is_british, local_voice

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
KOKORO_DIR = "Kokoro-82M"  # under the weights root, in both layouts
CONFIG_FILE = "config.json"
MODEL_FILE = "kokoro-v1_0.pth"
VOICES_DIR = "voices"
REPO_ID = "hexgrad/Kokoro-82M"
G2P_LOCK = threading.Lock()

# Penn Treebank tags misaki's G2P reads, set by rules instead of a statistical tagger (see the module docstring).
_RULE_TAGS = (
    ([{"ORTH": {"IN": [".", "!", "?"]}}], "."),
    ([{"ORTH": ","}], ","),
    ([{"ORTH": {"IN": [";", ":", "—", "–", "-", "…"]}}], ":"),
    ([{"IS_CURRENCY": True}], "$"),
    ([{"LIKE_NUM": True}], "CD"),
    ([{"ORTH": {"IN": ['"', "“"]}}], "``"),
    ([{"ORTH": "”"}], "''"),
)


@functools.cache
def offline_g2p(british: bool):
    """misaki's English G2P (American or British) on spaCy's rule-based tokenizer; needs no download.

    One per accent per process, shared by every synthesizer and used under `G2P_LOCK`: its espeak-ng fallback is
    a C library that is not thread-safe, and each backend instance loads a copy of it."""
    import spacy
    from misaki import en, espeak

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    for pattern, tag in _RULE_TAGS:
        ruler.add([pattern], {"TAG": tag})

    class OfflineG2P(en.G2P):
        """`en.G2P` with its tagger model replaced by `nlp`; espeak-ng reads unknown words, as in Kokoro."""

        def __init__(self) -> None:  # en.G2P.__init__ would download en_core_web_sm
            self.version, self.british, self.unk = None, british, ""
            self.nlp = nlp
            self.lexicon = en.Lexicon(british)
            self.fallback = espeak.EspeakFallback(british=british)

    return OfflineG2P()


def missing_files(folder: Path) -> list[str]:
    """The files of the published layout that `folder` lacks (the voices are checked when used)."""
    return [name for name in (CONFIG_FILE, MODEL_FILE) if not (folder / name).is_file()]


class SpeechSynthesizer:
    """Kokoro-82M loaded once from `folder`; `synthesize` may be called from one thread at a time per voice."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        from kokoro import KModel  # imports misaki and spaCy: only where speech is made

        folder = Path(folder)
        missing = missing_files(folder)
        if missing:
            raise FileNotFoundError(f"speech synthesis needs Kokoro-82M in {folder}, which lacks {', '.join(missing)}; "
                                    "run `multitalk weights download` (it fetches Kokoro-82M with the video model)")
        self.folder = folder
        self.device = torch.device(device)
        self.model = KModel(repo_id=REPO_ID, config=str(folder / CONFIG_FILE), model=str(folder / MODEL_FILE))
        self.model.to(self.device).eval()
        self.context = self.model.context_length - 2  # the phonemes one utterance may have (510)
        self._packs: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        logger.info("speech model loaded folder=%s device=%s", folder, self.device)

    def phonemes(self, text: str, british: bool) -> str:
        """The phonemes of `text` in Kokoro's alphabet (misaki's output)."""
        with G2P_LOCK:
            phonemes, _ = offline_g2p(british)(text)
        return phonemes.strip()

    def voice_pack(self, voice_id: str) -> torch.Tensor:
        with self._lock:
            if voice_id not in self._packs:
                path = self.folder / VOICES_DIR / f"{voice_id}.pt"
                if not path.is_file():
                    raise FileNotFoundError(f"voice {voice_id} is not installed: {path} is missing; run "
                                            "`multitalk weights download`")
                self._packs[voice_id] = torch.load(path, map_location="cpu", weights_only=True)
            return self._packs[voice_id]

    def synthesize(self, text: str, voice: str, text_field: str, seed: int, speed: float = 1.0) -> np.ndarray:
        """`text` spoken in `voice` (a hosted name or a Kokoro id) at `speed`: float32 samples at 24 kHz.

        Kokoro's vocoder draws noise (its harmonic source's phases and noise); it is drawn from `seed`, so the
        same request gives the same speech, as it gives the same video. Raises InputError naming `text_field`
        for a text with nothing to speak or too long for one utterance.
        """
        voice_id = local_voice(voice)
        phonemes = self.phonemes(text, is_british(voice_id))
        ids = [i for i in (self.model.vocab.get(p) for p in phonemes) if i is not None]
        if not any(p.isalpha() for p in phonemes):  # only pauses: what the submit-time rules let through is words
            raise InputError(text_field, "has nothing the voices can speak (no words after normalisation)")
        if len(ids) > self.context:
            raise InputError(text_field, f"is too long for one utterance: {len(ids)} phonemes, at most {self.context}")
        pack = self.voice_pack(voice_id)
        style = pack[len(ids) - 1].to(self.device)
        input_ids = torch.tensor([[0, *ids, 0]], device=self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(seed)
            audio, _ = self.model.forward_with_tokens(input_ids, style, speed)
        return audio.float().cpu().numpy().reshape(-1)
