"""One rank of the sequence-parallel check (run by tests/model/runtime/test_sequence_parallel.py under torchrun).

Loads the tiny transformer, splits its sequence (`ExecutionOptions.sequence_parallel`), runs the batched guidance
passes for the cases of `parallel_cases()`, and rank 0 saves the guided velocities to argv[1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.sampling.guidance import GuidanceCombiner, GuidanceConfig, guided_velocity, random_guidance_inputs
from model.weights.layout import find_layout, load_transformer


def parallel_cases(transformer) -> dict[str, tuple]:
    """name → (latent [1, 36, T, h, w], timestep, batch kwargs, guidance config). The grids make two ranks split
    a frame in the middle (3 frames of 32 tokens) and hold fewer tokens than the first frame has (1 frame)."""
    cfg = transformer.config
    cases = {}
    for name, (frames, height, width), speakers, text_scale in [
        ("two_speakers_3_pass", (3, 8, 16), 2, 5.0),
        ("two_speakers_2_pass_one_frame", (1, 8, 16), 2, 1.0),
        ("one_speaker", (3, 8, 16), 1, 5.0),
    ]:
        g = torch.Generator().manual_seed(frames * height * width + speakers)
        inputs = random_guidance_inputs(cfg, (frames, height, width), speakers, g)
        latent = torch.randn(1, 36, frames, height, width, generator=g)
        guidance = GuidanceConfig(text_scale=text_scale, audio_scale=4.0)
        cases[name] = (latent, torch.tensor([600.0]), inputs.transformer_kwargs(text_scale), guidance)
    return cases


def velocities(transformer) -> dict[str, torch.Tensor]:
    return {name: guided_velocity(transformer, latent, t, kwargs, GuidanceCombiner(guidance))
            for name, (latent, t, kwargs, guidance) in parallel_cases(transformer).items()}


def tiny_transformer(weights: Path):
    return load_transformer(find_layout(weights), torch.float32)


if __name__ == "__main__":
    import torch.distributed as dist

    from model.network.sequence_parallel import join_process_group
    from model.runtime.execution import ExecutionOptions, prepare_transformer

    out, weights, degree = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    device = join_process_group()
    model = tiny_transformer(weights)
    prepare_transformer(model, ExecutionOptions(sequence_parallel=degree), device)
    shard_lengths = []  # tokens this rank ran through the blocks, per forward
    model.token_shard.register_forward_hook(lambda module, args, out: shard_lengths.append(out.shape[1]))
    result = velocities(model)
    result["shard_lengths"] = torch.tensor(shard_lengths)
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.destroy_process_group()
