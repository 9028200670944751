"""MultiTalk's per-frame audio cross-attention with label-RoPE (L-RoPE) for two speakers.

Every latent frame is its own batch item: the video tokens of latent frame t attend only to the
audio tokens of latent frame t (32 per speaker). With one speaker that is plain attention. With two,
queries and keys get a 1-D rotary position: audio keys of person 1 sit at 2, of person 2 at 22; a
video token gets a position in [0, 4] if the reference map says it belongs to person 1, in [20, 24]
for person 2 and 12 for the background, so each region "hears" mostly its own speaker.

A batch may mix speaker counts (guidance batches a 2-speaker conditional pass with the 1-speaker
null-audio pass); the processor attends each speaker-count group separately.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn

from model.network.sequence_parallel import LocalTokens


@dataclass
class AudioConditioning:
    """Audio inputs shared by every block of one transformer forward.

    tokens: [B, T, P_max·K, C] audio tokens per latent frame (K per speaker, speakers in order).
    num_speakers: speakers of each batch item (1 or 2); item b uses the first num_speakers[b]·K tokens.
    token_masks: [B, 3, L_ref] person 1 / person 2 / background over the first latent frame's tokens.
    grid: (T, N_h, N_w) token grid of the video.
    local: the tokens this rank holds when the sequence is split across GPUs; None: all of them. None rather
        than a `LocalTokens` covering everything, because its bounds are Python ints that torch.compile would
        specialise the compiled blocks on (one graph per frame size and clip length); the processor takes the
        sizes from the tensors instead, which the transformer marks dynamic.
    map_everywhere: compute the reference map for every item, as the original does (reference schedule,
        parity checks); otherwise only for 2-speaker items, the only ones that use it.

    Batch items are addressed by slices of runs of equal speaker count (guidance orders its passes so
    that the 2-speaker ones come first): indexing with a Python list would copy an index tensor to the
    device, a host sync, in every block. Under torch.compile each speaker layout (`num_speakers`) is a graph
    of its own: the layouts run different code (L-RoPE and the reference map only for two speakers), and
    there are few of them (`Pipeline.warm_up` compiles every one the server runs).
    """

    tokens: torch.Tensor
    num_speakers: list[int]
    token_masks: torch.Tensor
    grid: tuple[int, int, int]
    local: LocalTokens | None
    map_everywhere: bool = False

    def speaker_runs(self) -> list[tuple[int, slice]]:
        """(speakers, items) for each run of consecutive batch items with the same speaker count."""
        runs: list[tuple[int, slice]] = []
        start = 0
        for b in range(1, len(self.num_speakers) + 1):
            if b == len(self.num_speakers) or self.num_speakers[b] != self.num_speakers[start]:
                runs.append((self.num_speakers[start], slice(start, b)))
                start = b
        return runs

    def reference_map_items(self) -> slice | None:
        """The contiguous items the reference map is computed for (from the first to the last that needs it)."""
        needed = [b for b, n in enumerate(self.num_speakers) if n == 2 or self.map_everywhere]
        return slice(needed[0], needed[-1] + 1) if needed else None


def apply_rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """1-D RoPE on x [..., S, H, D] at float positions [..., S]; pairs (2k, 2k+1), base 10000, in fp32."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=x.device)[: head_dim // 2].float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [..., S, D/2]
    cos, sin = angles.cos()[..., None, :], angles.sin()[..., None, :]  # broadcast over heads
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x_even * cos - x_odd * sin, x_odd * cos + x_even * sin], dim=-1).flatten(-2)
    return out.type_as(x)


def _row_extremes(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return row.min(dim=-1, keepdim=True).values, row.max(dim=-1, keepdim=True).values


def label_rope_positions(reference_map: torch.Tensor, class_range: int, class_interval: int,
                         extremes: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _row_extremes
                         ) -> torch.Tensor:
    """L-RoPE query positions [b, S] from the reference map [b, 3, S] (rows: person 1, person 2, background).

    Each person's row is min-max normalised over all tokens into its label interval
    ([0, interval] and [range − interval, range]); every token takes the position of its argmax class,
    the background taking range/2. `extremes` gives a row's (min, max) over all tokens: across ranks when
    the sequence is split.
    """

    def rescale(row: torch.Tensor, low: float, high: float) -> torch.Tensor:
        row_min, row_max = extremes(row)
        return (row - row_min) / (row_max - row_min + 1e-8) * (high - low) + low

    person1 = rescale(reference_map[:, 0], 0, class_interval)
    person2 = rescale(reference_map[:, 1], class_range - class_interval, class_range)
    background = torch.full_like(person1, float(class_range // 2))
    candidates = torch.stack([person1, person2, background], dim=1)  # [b, 3, S]
    return candidates.gather(1, reference_map.argmax(dim=1, keepdim=True)).squeeze(1)


class MultiTalkAudioAttnProcessor:
    """Per-latent-frame attention of video tokens over their frame's audio tokens (BSHD, via dispatch)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "MultiTalkAudioAttention",
        hidden_states: torch.Tensor,
        audio: AudioConditioning,
        reference_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, S, dim]; reference_map [b, 3, S] for the items `audio.reference_map_items()`."""
        heads, tokens_per_speaker = attn.heads, attn.tokens_per_speaker
        query = attn.to_q(hidden_states).unflatten(-1, (heads, -1))  # [B, S, H, D]
        key, value = attn.to_kv(audio.tokens).chunk(2, dim=-1)  # [B, T, N_a, dim] each
        map_items = audio.reference_map_items()
        local = audio.local
        local_frames = slice(None) if local is None else local.frames
        extremes = _row_extremes if local is None else local.extremes

        out = torch.empty_like(query)
        for speakers, items in audio.speaker_runs():
            n_keys = speakers * tokens_per_speaker
            q = query[items]
            k = key[items, local_frames, :n_keys].unflatten(-1, (heads, -1))  # [b, T_local, n_keys, H, D]
            v = value[items, local_frames, :n_keys].unflatten(-1, (heads, -1))
            frames = k.shape[1]  # T_local, from a shape: torch.compile keeps it symbolic
            if speakers == 2:
                ref = reference_map[items.start - map_items.start : items.stop - map_items.start]
                q = apply_rope_1d(q, label_rope_positions(ref, attn.class_range, attn.class_interval, extremes))
                k = apply_rope_1d(k, attn.speaker_key_positions(tokens_per_speaker, k.device))
            elif speakers != 1:
                raise ValueError(f"MultiTalk supports 1 or 2 speakers, got {speakers}")
            if local is not None:  # a rank's tokens need not start or end on a frame boundary: pad to whole frames
                q = local.pad_to_frames(q)
            q = q.unflatten(1, (frames, -1)).flatten(0, 1)  # [b·T_local, L, H, D]
            run_out = dispatch_attention_fn(
                q, k.flatten(0, 1), v.flatten(0, 1), dropout_p=0.0, is_causal=False, backend=self._attention_backend
            )
            run_out = run_out.unflatten(0, (-1, frames)).flatten(1, 2)  # [b, T_local·L, H, D]
            out[items] = (run_out if local is None else local.unpad(run_out)).type_as(out)
        return attn.to_out(out.flatten(2, 3))


class MultiTalkAudioAttention(nn.Module, AttentionModuleMixin):
    """Audio cross-attention of one block: q from the video stream, k/v from one fused projection of
    the audio tokens (k = first `dim` outputs, v = last), no q/k norm, output projection."""

    _default_processor_cls = MultiTalkAudioAttnProcessor
    _available_processors = [MultiTalkAudioAttnProcessor]
    _supports_qkv_fusion = False
    is_cross_attention = True

    def __init__(self, dim: int, heads: int, audio_dim: int, tokens_per_speaker: int, class_range: int, class_interval: int):
        super().__init__()
        self.heads = heads
        self.tokens_per_speaker = tokens_per_speaker
        self.class_range = class_range
        self.class_interval = class_interval
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(audio_dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.set_processor(MultiTalkAudioAttnProcessor())

    def speaker_key_positions(self, tokens_per_speaker: int, device: torch.device) -> torch.Tensor:
        """Positions of the two speakers' audio keys: the centres of their label intervals (2 and 22)."""
        person1 = self.class_interval / 2
        person2 = self.class_range - self.class_interval / 2
        # torch.full on the device: a Python list would be copied from the host (a sync) in every block.
        return torch.cat([torch.full((tokens_per_speaker,), person1, device=device),
                          torch.full((tokens_per_speaker,), person2, device=device)])

    def forward(self, hidden_states: torch.Tensor, audio: AudioConditioning, reference_map: torch.Tensor | None = None):
        return self.processor(self, hidden_states, audio, reference_map)
