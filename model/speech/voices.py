"""The voices the text endpoints speak in: Kokoro-82M's English voices, and the hosted voice names mapped to them.

Torch-free: the request contract takes its voice choices from here. The hosted endpoints
(`fal-ai/ai-avatar/single-text`, `.../multi-text`) offer 20 names of ElevenLabs' premade voices; each
maps to the Kokoro-82M v1.0 voice of the same gender and the nearest accent (Kokoro has American and
British English only, so the Australian, Swedish and transatlantic voices get a British one). Kokoro's
own ids (`af_heart`, `bm_george`, ...) are accepted as they are. The first letter of an id is its
accent (a: American, b: British: which G2P reads the text), the second its gender.
"""

from __future__ import annotations

from dataclasses import dataclass

AMERICAN, BRITISH = "a", "b"


@dataclass(frozen=True)
class HostedVoice:
    name: str  # as the hosted API spells it
    gender: str
    accent: str  # the ElevenLabs voice's
    local: str  # the Kokoro voice id it is spoken with


# In the hosted schema's order (VoiceEnum).
HOSTED_VOICES: tuple[HostedVoice, ...] = (
    HostedVoice("Aria", "female", "American", "af_heart"),
    HostedVoice("Roger", "male", "American", "am_michael"),
    HostedVoice("Sarah", "female", "American", "af_sarah"),
    HostedVoice("Laura", "female", "American", "af_bella"),
    HostedVoice("Charlie", "male", "Australian", "bm_lewis"),
    HostedVoice("George", "male", "British", "bm_george"),
    HostedVoice("Callum", "male", "Transatlantic", "bm_fable"),
    HostedVoice("River", "non-binary", "American", "af_river"),
    HostedVoice("Liam", "male", "American", "am_liam"),
    HostedVoice("Charlotte", "female", "Swedish", "bf_isabella"),
    HostedVoice("Alice", "female", "British", "bf_alice"),
    HostedVoice("Matilda", "female", "American", "af_kore"),
    HostedVoice("Will", "male", "American", "am_puck"),
    HostedVoice("Jessica", "female", "American", "af_jessica"),
    HostedVoice("Eric", "male", "American", "am_eric"),
    HostedVoice("Chris", "male", "American", "am_echo"),
    HostedVoice("Brian", "male", "American", "am_onyx"),
    HostedVoice("Daniel", "male", "British", "bm_daniel"),
    HostedVoice("Lily", "female", "British", "bf_lily"),
    HostedVoice("Bill", "male", "American", "am_adam"),
)

# Kokoro-82M v1.0's English voices (`voices/<id>.pt` in hexgrad/Kokoro-82M): what `weights download` fetches.
LOCAL_VOICES: tuple[str, ...] = (
    "af_alloy", "af_aoede", "af_bella", "af_heart", "af_jessica", "af_kore", "af_nicole", "af_nova", "af_river",
    "af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael", "am_onyx", "am_puck",
    "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george", "bm_lewis",
)

HOSTED_NAMES = tuple(voice.name for voice in HOSTED_VOICES)
VOICE_CHOICES = HOSTED_NAMES + LOCAL_VOICES  # what a `voice` field accepts
_LOCAL_OF = {voice.name: voice.local for voice in HOSTED_VOICES}
assert set(_LOCAL_OF.values()) <= set(LOCAL_VOICES), "every hosted voice must map to a downloaded local voice"


def local_voice(name: str) -> str:
    """The Kokoro voice id of a hosted voice name or a Kokoro id (KeyError for anything else)."""
    if name in _LOCAL_OF:
        return _LOCAL_OF[name]
    if name in LOCAL_VOICES:
        return name
    raise KeyError(name)


def is_british(voice_id: str) -> bool:
    """Whether a Kokoro voice reads British English (its text goes through the British G2P)."""
    return voice_id.startswith(BRITISH)
