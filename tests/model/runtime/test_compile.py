"""`ExecutionOptions.compile` after the server's warm-up: every request the server serves runs the compiled blocks
without compiling again, and the combinations with the memory options either work or are refused.

The tiny frame sizes stand in for the 36 buckets of both resolutions (each a quarter of its bucket, so the token
grids stay distinct) and the latent frame counts are those of every clip `plan_clips` makes for the requests'
`num_frames`. The compiles are inductor's, as in production (the backend can add guards of its own).
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from model.contract.fields import ACCELERATION, NUM_FRAMES, RESOLUTION
from model.media.image_input import BUCKETS
from model.pipeline import Pipeline
from model.runtime.execution import ExecutionOptions
from model.runtime.lora import use_lora
from model.sampling.acceleration import SamplingRecipe, recipe_for
from model.sampling.guidance import random_guidance_inputs
from model.sampling.long_video import plan_clips
from model.sampling.sampler import ClipInputs, sample_clip
from model.sampling.schedule import sampling_timesteps
from model.sampling.teacache import TeaCacheConfig
from model.sampling.video_generation import LATENT_CHANNELS
from model.weights.tiny import write_tiny_lora

SCALE = 4  # tiny frame size = bucket / 4: token grids of 5 × 19 … 15 × 15 instead of 20 × 76 … 60 × 60
FRAME_SIZES = sorted({(h // SCALE, w // SCALE) for table in BUCKETS.values() for h, w in table.values()})
LATENT_FRAMES = sorted({clip.latent_frames for frames in range(NUM_FRAMES.minimum, NUM_FRAMES.maximum + 1)
                        for clip in plan_clips(frames)})
WARM_UP_FRAME_SIZE = (448 // SCALE, 896 // SCALE)  # the server's default warm-up size, scaled like the buckets


def test_served_sizes_are_distinct_grids_and_clip_lengths():
    assert len(FRAME_SIZES) == len({size for table in BUCKETS.values() for size in table.values()}) == 36
    assert len({(h // 16, w // 16) for h, w in FRAME_SIZES}) == 36
    assert LATENT_FRAMES == list(range(11, 22))


def test_compile_with_fp8_storage_is_refused_naming_both_options_and_the_alternatives():
    with pytest.raises(ValueError, match=r"compile cannot be combined with weights='fp8-storage'.*use weights='int8'"):
        ExecutionOptions(weights="fp8-storage", compile=True)
    assert ExecutionOptions(weights="fp8-storage").weights == "fp8-storage"
    assert ExecutionOptions(weights="int8", offload="blocks", compile=True).compile


@pytest.fixture
def fresh_dynamo(tmp_path, monkeypatch):
    """Compiled code and counters of earlier tests must not count here (nor ours in later tests), and neither may
    their on-disk inductor caches: an AOTAutograd cache entry of an earlier test's graph brings its size guards
    (seen: `S <= 4096`, from graphs traced at other sizes) into this one, which then recompiles at larger sizes.
    A server starts from its own cache; whether entries from an earlier run can narrow its graphs is for the GPU
    proof's compile stage to watch."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _served_states(pipeline: Pipeline) -> list[tuple[SamplingRecipe, int]]:
    """(recipe, speakers) of every request the server accepts: each preset at each resolution, 1 or 2 speakers."""
    presets = (recipe_for(acceleration, resolution, pipeline.loras)
               for acceleration in ACCELERATION.choices for resolution in RESOLUTION.choices)
    # Presets that differ only in numbers (shift, steps, scales, TeaCache threshold) give the blocks the same inputs.
    recipes = {(recipe.guidance.pass_names, recipe.lora): recipe for recipe in presets}
    return [(recipe, speakers) for recipe in recipes.values() for speakers in (1, 2)]


def _one_step(pipeline: Pipeline, recipe: SamplingRecipe, speakers: int, frame_size: tuple[int, int],
              latent_frames: int, teacache: bool) -> torch.Tensor:
    """One denoising step of a clip as a request runs it: its LoRA, guidance passes and (optionally) TeaCache."""
    transformer = pipeline.components.transformer
    use_lora(transformer, recipe.lora, recipe.lora_scale)
    grid = (latent_frames, frame_size[0] // 8, frame_size[1] // 8)
    generator = torch.Generator().manual_seed(latent_frames)
    inputs = ClipInputs(noise=torch.randn(LATENT_CHANNELS, *grid, generator=generator),
                        condition=torch.randn(1, 4 + LATENT_CHANNELS, *grid, generator=generator),
                        guidance_inputs=random_guidance_inputs(transformer.config, grid, speakers, generator))
    cache = TeaCacheConfig.for_run("480p", 0.2, steps=1) if teacache else None
    latent, _ = sample_clip(transformer, inputs, sampling_timesteps(1, recipe.shift), recipe.guidance, generator, cache)
    return latent


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_warmed_up_blocks_serve_every_frame_size_clip_length_and_state_without_recompiling(
        tiny_weights, tiny_pipeline, tmp_path, fresh_dynamo):
    """With both distilled LoRAs installed (the most states): 3 presets' recipes × 1 or 2 speakers, each over all
    36 grids and 11 clip lengths, TeaCache on and off; compiled outputs equal eager ones away from the warm-up size."""
    root = tiny_weights["multitalk"]
    loras = [write_tiny_lora(tmp_path / f"{name}.safetensors", tiny_pipeline.components.transformer, seed=seed)
             for seed, name in enumerate(("fusionx", "lightx2v"))]
    eager = Pipeline.from_weights(root, loras=loras)
    compiled = Pipeline.from_weights(root, loras=loras, execution=ExecutionOptions(compile=True))
    compiled.warm_up(WARM_UP_FRAME_SIZE)
    states = _served_states(compiled)
    assert len(states) == 6
    warm_up_graphs = _compiled_graphs()
    assert warm_up_graphs == len(states)  # one graph per state: frame size and clip length are dynamic
    assert warm_up_graphs <= torch._dynamo.config.recompile_limit  # else blocks beyond it would silently run eagerly

    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile fails with its guard as the reason
        for recipe, speakers in states:
            for i, frame_size in enumerate(FRAME_SIZES):
                latent_frames = LATENT_FRAMES[i % len(LATENT_FRAMES)]
                step = _one_step(compiled, recipe, speakers, frame_size, latent_frames, teacache=i % 2 == 1)
                if i == 0:
                    expected = _one_step(eager, recipe, speakers, frame_size, latent_frames, teacache=False)
                    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4)
    assert _compiled_graphs() == warm_up_graphs


@pytest.mark.slow
def test_offloaded_compiled_blocks_equal_eager_without_recompiling(tiny_weights, tiny_pipeline, fresh_dynamo):
    """Block offloading's hooks run between the compiled graphs (diffusers disables compilation of its onload and
    offload): after the warm-up new sizes and speaker counts compile nothing and give the eager outputs."""
    offloaded = Pipeline.from_weights(tiny_weights["multitalk"],
                                      execution=ExecutionOptions(offload="blocks", compile=True))
    offloaded.warm_up(WARM_UP_FRAME_SIZE)
    warm_up_graphs = _compiled_graphs()
    recipe = recipe_for("none", "480p")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for speakers in (1, 2):
            for frame_size, latent_frames in ((FRAME_SIZES[0], LATENT_FRAMES[0]), (FRAME_SIZES[-1], LATENT_FRAMES[-1])):
                step = _one_step(offloaded, recipe, speakers, frame_size, latent_frames, teacache=True)
                expected = _one_step(tiny_pipeline, recipe, speakers, frame_size, latent_frames, teacache=True)
                torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-4)
    assert _compiled_graphs() == warm_up_graphs
