"""Sampling pieces the golden runs do not isolate: clip plans, TeaCache in 2-pass mode, acceleration presets."""

import pytest
import torch

from model.sampling.acceleration import recipe_for
from model.sampling.long_video import audio_windows, clip_audio, extend_for_last_clip, frame_mask, plan_clips
from model.sampling.teacache import TeaCache, TeaCacheConfig


@pytest.mark.parametrize("frames, starts, length", [
    (41, [0], 41), (42, [0], 45), (81, [0], 81), (82, [0, 56], 81), (181, [0, 56, 112], 81),
    (241, [0, 56, 112, 168], 81),
])
def test_clip_plan_covers_the_requested_frames(frames, starts, length):
    clips = plan_clips(frames)
    assert [c.start for c in clips] == starts and {c.frames for c in clips} == {length}
    generated = clips[0].frames + sum(c.frames - c.keep_from for c in clips[1:])
    assert frames <= generated < frames + 56
    assert [c.is_last for c in clips] == [False] * (len(clips) - 1) + [True]
    assert all(c.condition_frames == (1 if c.is_first else 25) for c in clips)


def test_audio_windows_clamp_and_last_clip_mirrors():
    rows = torch.arange(10.0)[:, None, None]  # [L=10, 1, 1]
    windows = audio_windows(rows, start=0, frames=3)
    assert windows[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    extended = extend_for_last_clip(rows, end=12)  # miss = 12 − 10 + 3 = 5 rows, reversed
    assert extended[10:, 0, 0].tolist() == [9, 8, 7, 6, 5]
    last = plan_clips(181)[-1]
    assert clip_audio([torch.arange(181.0)[:, None, None]], last).shape == (1, 81, 5, 1, 1)


def test_frame_mask_flags_the_conditioning_frames():
    first = frame_mask(81, 1, (2, 2))
    later = frame_mask(81, 25, (2, 2))
    assert first.shape == (1, 4, 21, 2, 2)
    assert first[0, :, 0].all() and not first[0, :, 1:].any()
    assert later[0, :, :7].all() and not later[0, :, 7:].any()


def _run(cache: TeaCache, signals: list[float], batch: int):
    """Feed one call per step whose modulated input is a constant `value`; count block-stack runs."""
    runs = []

    def blocks(h):
        runs.append(1)
        return h + 1.0

    outputs = []
    for value in signals:
        proj = torch.full((batch, 6, 4), value)
        outputs.append(cache(torch.zeros(batch, 3, 4), proj[:, 0], proj, blocks))
    return runs, outputs


def test_teacache_two_pass_keeps_each_branch_on_its_own_schedule():
    config = TeaCacheConfig(threshold=1.0, coefficients=(1.0, 0.0), warmup_steps=2, cutoff_step=None,
                            use_timestep_proj=True)
    cache = TeaCache(config, ["cond", "drop_audio"], record_decisions=True)
    # rel. L1 changes: step 2: 0.1, step 3: 0.1 (acc 0.2 < 1 → skip), step 4: 1.0 (acc 1.2 → compute)
    runs, outputs = _run(cache, [1.0, 1.0, 1.1, 1.21, 2.42], batch=2)
    decisions = [(d.branch, d.call, d.computed) for d in cache.decisions]
    assert decisions == [(b, i, c) for i, c in enumerate([True, True, False, False, True]) for b in ("cond", "drop_audio")]
    assert len(runs) == 3
    assert all(torch.equal(o, torch.ones_like(o)) for o in outputs)  # a skip replays the stored residual


def test_teacache_records_decisions_only_when_asked():
    """A request's cache keeps no per-call diagnostics; only parity checks and tests ask for them."""
    config = TeaCacheConfig(threshold=1.0, coefficients=(1.0, 0.0), warmup_steps=1, cutoff_step=None,
                            use_timestep_proj=True)
    cache = TeaCache(config, ["cond"])
    _run(cache, [1.0, 1.0, 1.1], batch=1)
    assert cache.decisions is None


def test_acceleration_presets():
    none = recipe_for("none", "480p")
    assert (none.steps, none.shift, none.guidance.text_scale, none.teacache_threshold) == (40, 7.0, 5.0, None)
    assert recipe_for("none", "720p").shift == 11.0
    assert recipe_for("regular", "480p").teacache_threshold == 0.2
    fusionx = recipe_for("regular", "480p", ["Wan2_1_I2V_14B_FusionX_LoRA"])
    assert (fusionx.steps, fusionx.shift, fusionx.guidance.pass_names, fusionx.lora) == (
        8, 2.0, ("cond", "drop_audio"), "Wan2_1_I2V_14B_FusionX_LoRA")
    high = recipe_for("high", "480p", ["lightx2v_rank32", "fusionx"])
    assert (high.steps, high.lora) == (4, "lightx2v_rank32")
    assert recipe_for("high", "480p").steps == 20
