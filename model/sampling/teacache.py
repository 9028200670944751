"""TeaCache for MultiTalk: skip the transformer blocks when the timestep embedding barely moved.

Per guidance branch (cond / drop_text / uncond, or cond / drop_audio in the 2-pass mode) a branch keeps
the modulated input of its previous call, an accumulator and the residual its blocks added last time.
On each call: during the first `warmup_steps` calls of the branch (and from `cutoff_step` on) the blocks
run and the accumulator resets; otherwise the accumulator grows by `poly(mean|x − x_prev| / mean|x_prev|)`
and the blocks are skipped — the stored residual is added to the fresh patch embedding — while it stays
below the threshold. The original counts calls modulo 3 on the model class, so its 2-pass mode mixes
branches; here each branch counts its own calls, which is the same in 3-pass mode and correct in 2-pass.
A cache object lives for one clip (the original's counter wraps at every clip boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

# Polynomial coefficients (highest degree first), from the original, per resolution.
# use_ret_steps=True (the original always uses it): input = timestep projection e0 [B, 6, dim], 5 warm-up steps.
# use_ret_steps=False (kept in the original but unused): input = time embedding e [B, dim], 1 warm-up step.
COEFFICIENTS = {
    ("480p", True): (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
    ("720p", True): (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
    ("480p", False): (-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
    ("720p", False): (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
}


@dataclass(frozen=True)
class TeaCacheConfig:
    threshold: float
    coefficients: tuple[float, ...]
    warmup_steps: int  # calls per branch that always compute
    cutoff_step: int | None  # from this call per branch on, always compute (None: never)
    use_timestep_proj: bool  # e0 (True) or the time embedding e (False) as the change signal

    @classmethod
    def for_run(cls, resolution: str, threshold: float, steps: int, use_ret_steps: bool = True) -> "TeaCacheConfig":
        """The original's `teacache_init(use_ret_steps, thresh, sample_steps, model_scale)` in per-branch steps."""
        if use_ret_steps:
            return cls(threshold, COEFFICIENTS[(resolution, True)], warmup_steps=5, cutoff_step=steps, use_timestep_proj=True)
        return cls(threshold, COEFFICIENTS[(resolution, False)], warmup_steps=1, cutoff_step=steps - 1,
                   use_timestep_proj=False)


@dataclass
class _BranchState:
    calls: int = 0
    accumulated: float = 0.0
    previous_input: torch.Tensor | None = None
    residual: torch.Tensor | None = None


@dataclass
class TeaCacheDecision:
    branch: str
    call: int
    computed: bool
    accumulated: float


class TeaCache:
    """Block-stack cache for one clip; `branches` names the batch items of every forward, in order."""

    def __init__(self, config: TeaCacheConfig, branches: Sequence[str], record_decisions: bool = False):
        """`record_decisions` keeps every call's decision in `decisions`, for parity checks and tests; a request
        does not pay for it."""
        self.config = config
        self.branches = tuple(branches)
        self.states = {name: _BranchState() for name in self.branches}
        self.rescale = np.poly1d(config.coefficients)
        self.decisions: list[TeaCacheDecision] | None = [] if record_decisions else None

    def _decide(self, state: _BranchState, distance: float | None) -> bool:
        cfg = self.config
        forced = state.calls < cfg.warmup_steps or (cfg.cutoff_step is not None and state.calls >= cfg.cutoff_step)
        if forced or distance is None:
            state.accumulated = 0.0
            return True
        state.accumulated += float(self.rescale(distance))
        if state.accumulated < cfg.threshold:
            return False
        state.accumulated = 0.0
        return True

    def __call__(self, hidden_states: torch.Tensor, temb: torch.Tensor, timestep_proj: torch.Tensor,
                 run_blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """hidden_states [B, S, dim] after patch embedding → after the block stack (run or replayed)."""
        if hidden_states.shape[0] != len(self.branches):
            raise ValueError(f"TeaCache expects {len(self.branches)} batch items ({self.branches}), "
                             f"got {hidden_states.shape[0]}")
        signal = (timestep_proj if self.config.use_timestep_proj else temb).float()
        states = [self.states[name] for name in self.branches]
        # One host sync for all branches: relative L1 change of each item's signal.
        distances: list[float | None] = [None] * len(states)
        known = [i for i, s in enumerate(states) if s.previous_input is not None]
        if known:
            prev = torch.stack([states[i].previous_input for i in known])
            cur = signal[known]
            rel = (cur - prev).abs().flatten(1).mean(1) / prev.abs().flatten(1).mean(1)
            for i, value in zip(known, rel.tolist()):
                distances[i] = value
        compute = [self._decide(s, d) for s, d in zip(states, distances)]
        for i, (name, state) in enumerate(zip(self.branches, states)):
            if self.decisions is not None:
                self.decisions.append(TeaCacheDecision(name, state.calls, compute[i], state.accumulated))
            state.previous_input = signal[i].clone()
            state.calls += 1

        if not any(compute):
            return hidden_states + torch.stack([s.residual for s in states]).to(hidden_states.dtype)
        output = run_blocks(hidden_states)
        residual = output - hidden_states
        if all(compute):
            for i, state in enumerate(states):
                state.residual = residual[i]
            return output
        merged = []
        for i, state in enumerate(states):
            if compute[i]:
                state.residual = residual[i]
                merged.append(output[i])
            else:  # another branch forced the stack to run; this one still replays its own residual
                merged.append(hidden_states[i] + state.residual.to(hidden_states.dtype))
        return torch.stack(merged)
