"""What a text must be for speech synthesis to read it, and how much of it a video can hold. Torch-free.

The voices are English (Kokoro-82M's American and British voices, read by misaki's English G2P), so a
text is Latin-script letters, digits, spaces and the punctuation and symbols English prose uses; an emoji,
a Chinese or Cyrillic letter would be dropped or spelled out letter by letter, so it is refused instead,
naming the character. The length limit is a speaking rate: `CHARS_PER_SECOND` characters per second of
video is fast speech (≈ 200 words a minute, ≈ 1.3× the voices' own pace), so a longer text cannot be
spoken within the video and is refused at submit with the limit, instead of being cut mid-sentence.
Speech that still comes out longer than the video is spoken faster, up to `MAX_SPEED_UP`
(`model.pipeline.Pipeline.speak`), and refused beyond.
"""

from __future__ import annotations

import unicodedata

CHARS_PER_SECOND = 20
MAX_SPEED_UP = 1.5
# Punctuation and symbols of English prose that the G2P reads or pauses at (besides ASCII, which is all allowed).
_EXTRA_PUNCTUATION = frozenset("‘’“”–—…·•€£¥¢°§©®™«»¿¡")


def unreadable_character(text: str) -> tuple[int, str] | None:
    """(position, character) of the first character the English voices cannot read, or None."""
    for position, char in enumerate(text):
        if (char.isascii() and (char.isprintable() or char in "\t\n\r")) or char in _EXTRA_PUNCTUATION:
            continue
        if unicodedata.name(char, "").startswith("LATIN") or unicodedata.category(char) == "Zs":
            continue
        return position, char
    return None


def speech_text_problem(text: str) -> str | None:
    """Why `text` cannot be spoken (empty, or a character the voices cannot read), or None."""
    if not text.strip():
        return "must contain words to speak, got an empty or blank text"
    if not any(char.isalnum() for char in text):
        return "must contain words to speak, got only punctuation or symbols"
    found = unreadable_character(text)
    if found is not None:
        position, char = found
        name = unicodedata.name(char, f"U+{ord(char):04X}")
        return (f"contains a character the English voices cannot read: {char!r} ({name}) at position {position}; "
                "use Latin letters, digits and common punctuation")
    return None


def max_speech_chars(num_frames: int, fps: int) -> int:
    """The most characters of text (all speakers together) a video of `num_frames` frames at `fps` can hold."""
    return num_frames * CHARS_PER_SECOND // fps


def speech_length_problem(texts: list[tuple[str, str]], num_frames: int, fps: int,
                          in_turn: bool = True) -> tuple[str, str] | None:
    """(field, reason) when the texts need more time than the video has, else None.

    `texts` is (field, text) per speaker, in speaking order. Spoken in turn (`add`), they share the video and
    the field named is the first whose text no longer fits after the ones before it; spoken at once (`para`),
    each has the whole video.
    """
    limit = max_speech_chars(num_frames, fps)
    used = 0
    for field, text in texts:
        used = (used if in_turn else 0) + len(text.strip())
        if used > limit:
            together = " together with the text before it" if used > len(text.strip()) else ""
            return field, (f"is too long to be spoken in {num_frames} frames ({num_frames / fps:g} s): "
                           f"{used} characters{together}, at most {limit} fit ({CHARS_PER_SECOND} characters per "
                           f"second of video); shorten the text or raise num_frames")
    return None
