"""Sequence parallelism for one job on several GPUs, through diffusers' context parallelism.

diffusers splits the token sequence across ranks after the patch embedding (`_cp_plan` of the
transformer), runs self-attention across ranks (Ulysses all-to-all over heads and/or ring attention),
and gathers the output before the head. What MultiTalk adds on top is handled here:

* the audio cross-attention is per latent frame, and a rank's contiguous token range rarely starts or
  ends on a frame boundary: the rank pads its queries out to whole frames, attends each frame to that
  frame's audio tokens, and drops the padding (`LocalTokens.pad_to_frames`);
* the reference map needs the first latent frame's keys, which may sit on other ranks: they are
  all-gathered (`LocalTokens.first_tokens`), as MultiTalk's own xDiT path does;
* L-RoPE normalises each person's map row by its minimum and maximum over the whole video: those are
  all-reduced across ranks (`LocalTokens.extremes`).

Launch with `torchrun --nproc-per-node N $(which multitalk) generate --sequence-parallel N ...` (one process
per GPU); every rank computes the same video and rank 0 writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.contract.fields import seed_or_random


@dataclass(frozen=True)
class LocalTokens:
    """This rank's slice [start, stop) of the S = T·L tokens (L per latent frame): diffusers gives rank r the
    r-th of `world` equal chunks. Without parallelism: all of them.

    parallel_config: the transformer's diffusers `ParallelConfig` (None when not parallel).
    """

    start: int
    stop: int
    tokens_per_frame: int
    world: int = 1
    parallel_config: object | None = None

    @classmethod
    def of(cls, total: int, tokens_per_frame: int, parallel_config) -> "LocalTokens":
        if parallel_config is None or parallel_config.context_parallel_config is None:
            return cls(0, total, tokens_per_frame)
        mesh = parallel_config.context_parallel_config._flattened_mesh
        world = mesh.size()
        if total % world:
            # Every bucket of both resolutions has a multiple of 8 tokens per frame; only a custom frame size
            # can get here.
            raise ValueError(f"frame_size: sequence parallelism over {world} GPUs needs a token count divisible "
                             f"by {world}, got {total} ({tokens_per_frame} per latent frame); use a resolution bucket")
        size, rank = total // world, dist.get_rank(mesh.get_group())
        return cls(rank * size, (rank + 1) * size, tokens_per_frame, world, parallel_config)

    @property
    def is_parallel(self) -> bool:
        return self.parallel_config is not None

    @property
    def frames(self) -> slice:
        """The latent frames this rank's tokens touch."""
        return slice(self.start // self.tokens_per_frame, (self.stop - 1) // self.tokens_per_frame + 1)

    @property
    def leading(self) -> int:
        """Tokens of the first touched frame that come before this rank's slice (held by the previous rank)."""
        return self.start - self.frames.start * self.tokens_per_frame

    def pad_to_frames(self, x: torch.Tensor) -> torch.Tensor:
        """[b, stop − start, ...] → [b, frames·L, ...], zeros before and after this rank's tokens."""
        trailing = self.frames.stop * self.tokens_per_frame - self.stop
        if self.leading == 0 and trailing == 0:
            return x
        return torch.nn.functional.pad(x, [0, 0] * (x.ndim - 2) + [self.leading, trailing])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `pad_to_frames`."""
        return x[:, self.leading : self.leading + self.stop - self.start]

    def _group(self):
        return self.parallel_config.context_parallel_config._flattened_mesh.get_group()

    def first_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The first `count` tokens of the whole sequence, from every rank's [b, s_local, ...] slice.

        Each rank contributes its first min(s_local, count) tokens; in rank order they start the global
        sequence (rank 0 alone holds them unless there are fewer tokens per rank than `count`).
        """
        if not self.is_parallel:
            return x[:, :count]
        import torch.distributed._functional_collectives as funcol

        local = x[:, :count].contiguous()
        gathered = funcol.all_gather_tensor(local, 0, self._group())  # [world·b, min(s_local, count), ...]
        return torch.cat(gathered.chunk(self.world, dim=0), dim=1)[:, :count]

    def extremes(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) over the last dimension of [..., s_local], across every rank's tokens."""
        low = values.min(dim=-1, keepdim=True).values
        high = values.max(dim=-1, keepdim=True).values
        if not self.is_parallel:
            return low, high
        import torch.distributed._functional_collectives as funcol

        return funcol.all_reduce(low, "min", self._group()), funcol.all_reduce(high, "max", self._group())


def join_process_group() -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU); returns this rank's device.

    The rank's GPU is made current before NCCL starts, and named to it: otherwise every rank's communicator
    is first created on GPU 0 (extra memory there, and a hang when ranks pick different devices later).
    """
    if not torch.cuda.is_available():
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=device)
    return device


def agreed_seed(seed: int | None) -> int:
    """Every rank must sample the same noise: rank 0's seed (a random one when None) is broadcast to all."""
    value = [seed_or_random(seed)]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def enable_sequence_parallel(transformer, degree: int) -> None:
    """Split `transformer`'s token sequence over `degree` ranks with Ulysses attention (an all-to-all over heads,
    so the head count, 40 for the 14B model, must be divisible by `degree`). The attention backend must be one
    diffusers runs across ranks (`model.runtime.attention_backends` picks among those when told)."""
    from diffusers import ContextParallelConfig

    heads = transformer.config.num_attention_heads
    if heads % degree:
        raise ValueError(f"sequence_parallel: {degree} does not divide the model's {heads} attention heads")
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
