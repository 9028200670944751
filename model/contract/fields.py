"""The request's limits and choices, in one torch-free module.

The pipeline validates against these, and the HTTP schemas (`server/`, which must not import torch)
build their fields from them, so the two can never disagree.
"""

import random

NUM_FRAMES_RANGE = (41, 241)
MAX_SEED = 2**32 - 1  # the hosted API accepts 0..4294967295
RESOLUTIONS = ("480p", "720p")
ACCELERATIONS = ("none", "regular", "high")
AUDIO_MODES = ("add", "para")  # speakers in turn / at the same time


def seed_or_random(seed: int | None) -> int:
    """The request's seed, or a random one in the accepted range when it has none."""
    return seed if seed is not None else random.randint(0, MAX_SEED)
