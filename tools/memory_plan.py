"""Measure the GPU memory of a MultiTalk request at the published sizes without a GPU: fake tensors.

Every model of the pipeline is built at its published size (`tools/real_size.py`) under torch's
`FakeTensorMode`: tensors carry shapes, dtypes and storages but no data, and no kernel runs. A
dispatch mode (`LiveBytes`) sees every tensor each operator creates and counts the bytes of the
storages alive, so the peak of a phase is the largest sum of live storages — what a caching allocator
must hold, before its rounding and fragmentation, which `model.runtime.memory_budget` adds as a margin.

Phases, as `Pipeline.generate` runs them, each measured once per case it depends on:
  clip      one 81-frame clip through `generate_video_clips`: CLIP and VAE encode of the conditioning
            video, the denoising steps (all guidance passes batched), VAE decode of the clip and colour
            correction — per resolution (its largest bucket), speakers (1, 2) and passes (3: `none` and the
            TeaCache fallbacks, plus TeaCache's residual cache; 2: the distilled LoRA recipes).
  text      umT5-XXL encoding the prompt and the negative prompt (512 tokens each).
  audio     wav2vec2-base over the longest track it reads (`AUDIO_CONTEXT_S`).
Weights are counted from the models' parameters: per component, and for the transformer per weight
storage (block linears at 1 byte per weight plus a per-row scale for fp8/int8).

The fake models run on the CPU device: eager CPU SDPA picks its flash kernel, which, like the GPU
kernels the server uses, never materialises the attention matrix.

Usage:
    python tools/memory_plan.py --write      measure every case, write model/runtime/memory_plan.json
    python tools/memory_plan.py              print the predicted table (markdown) from that file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from model.media.image_input import largest_bucket
from model.pipeline import AUDIO_CONTEXT_S
from model.runtime.attention_backends import apply_attention_backend
from model.runtime.memory import is_block_linear
from model.runtime.memory_budget import (
    ACTIVATION_CASES,
    PLAN_PATH,
    MemoryPlan,
    predict,
    predicted_cases,
)
from model.sampling.acceleration import recipe_for
from model.sampling.long_video import CLIP_FRAMES, plan_clips
from model.sampling.schedule import sampling_timesteps
from model.sampling.video_generation import (
    SamplingSettings,
    VideoConditioning,
    generate_video_clips,
)
from model.weights.layout import Precision
from tools.real_size import (
    random_audio_encoder,
    random_image_encoder,
    random_text_encoder,
    random_transformer,
    random_vae,
)

MEASURED_STEPS = 3  # TeaCache computes its first steps and caches a residual from then on; the peak repeats per step
TEXT_TOKENS = 512
WAV2VEC2_LAYERS, WAV2VEC2_DIM = 12, 768
SAMPLE_RATE = 16000


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, over the operators run inside the mode.

    Storages are counted once however many views share them, and uncounted when they are freed
    (a weak reference's callback), so in-place ops and views cost nothing, as on a real allocator.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, tensors: Iterable) -> None:
        """Count `tensors` (e.g. weights made before the mode) as alive."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen:
                continue
            size = storage.nbytes()
            self._seen[storage] = size
            self.current += size
            weakref.finalize(storage, self._free, size)
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(tree_leaves(out))
        return out


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def transformer_weights(transformer) -> dict[str, int]:
    """The transformer's bytes as loaded (bf16) and with its block linears' weights at 1 byte each plus one fp32
    scale per output row (`one_byte`: fp8 keeps per-row fp32 scales, int8 bf16 ones, fp8-storage none — the
    figure bounds all three), whole and per block."""
    linears = [m.weight for name, m in transformer.named_modules() if is_block_linear(m, name)]
    saving = _bytes(linears) - sum(w.numel() + 4 * w.shape[0] for w in linears)
    total = _bytes([*transformer.parameters(), *transformer.buffers()])
    blocks = _bytes([*transformer.blocks.parameters(), *transformer.blocks.buffers()])
    count = len(transformer.blocks)
    return {
        "bf16": total,
        "one_byte": total - saving,
        "outside_blocks": total - blocks,
        "block_bf16": blocks // count,
        "block_one_byte": (blocks - saving) // count,
        "largest_block_linear_bf16": max(_bytes([w]) for w in linears),
    }


def measure_clip(components: dict, resolution: str, speakers: int, passes: int) -> int:
    """Peak bytes above the resident weights while one 81-frame clip is made (see the module docstring)."""
    transformer, vae, image_encoder = components["transformer"], components["vae"], components["image_encoder"]
    height, width = largest_bucket(resolution)
    recipe = recipe_for("none" if passes == 3 else "high", resolution, ["lightx2v"] if passes == 2 else [])
    settings = SamplingSettings(sampling_timesteps(MEASURED_STEPS, recipe.shift), recipe.guidance, None, 1.0)
    transformer.rope._tables.clear()  # the RoPE tables cached for the last grid: each case builds and counts its own
    with LiveBytes() as live:
        live.track(_all_tensors(components))
        base = live.current
        conditioning = VideoConditioning(
            reference=torch.zeros(1, 3, 1, height, width),
            embeddings=[torch.zeros(CLIP_FRAMES, WAV2VEC2_LAYERS, WAV2VEC2_DIM) for _ in range(speakers)],
            context=torch.zeros(TEXT_TOKENS, transformer.config.text_dim),
            negative_context=torch.zeros(TEXT_TOKENS, transformer.config.text_dim),
            ref_target_masks=torch.zeros(3, height // 8, width // 8),
        )
        generator = torch.Generator("cpu").manual_seed(0)
        for _ in generate_video_clips(transformer, vae, image_encoder, conditioning, plan_clips(CLIP_FRAMES),
                                      settings, generator):
            pass
        return live.peak - base + (teacache_cache_bytes(transformer, height, width, passes) if passes == 3 else 0)


def teacache_cache_bytes(transformer, height: int, width: int, passes: int) -> int:
    """TeaCache's residual cache, counted from its size: its skip decision reads values (`tolist`), which fake
    tensors do not have, so the 3-pass clips run without it and add one hidden state per pass, which it keeps
    alive through every step (model/sampling/teacache.py)."""
    p_t, p_h, p_w = transformer.config.patch_size
    tokens = (1 + (CLIP_FRAMES - 1) // 4) // p_t * (height // 8 // p_h) * (width // 8 // p_w)
    return passes * tokens * transformer.config.num_attention_heads * transformer.config.attention_head_dim * \
        transformer.dtype.itemsize


def measure_text(components: dict) -> int:
    encoder = components["text_encoder"]
    with LiveBytes() as live:
        live.track(_all_tensors(components))
        base = live.current
        ids = torch.zeros(2, TEXT_TOKENS, dtype=torch.long)
        mask = torch.ones(2, TEXT_TOKENS, dtype=torch.long)
        with torch.no_grad():
            encoder.model(input_ids=ids, attention_mask=mask)
        return live.peak - base


def measure_audio(components: dict) -> int:
    encoder = components["audio_encoder"]
    with LiveBytes() as live:
        live.track(_all_tensors(components))
        base = live.current
        encoder.encode(np.zeros(int(AUDIO_CONTEXT_S * SAMPLE_RATE), dtype=np.float32))  # numpy, as the pipeline passes it
        return live.peak - base


def _all_tensors(components: dict) -> list[torch.Tensor]:
    return [t for module in _modules(components).values() for t in (*module.parameters(), *module.buffers())]


def _modules(components: dict) -> dict[str, torch.nn.Module]:
    return {
        "transformer": components["transformer"],
        "text_encoder": components["text_encoder"].model,
        "image_encoder": components["image_encoder"].model,
        "vae": components["vae"].vae,
        "audio_encoder": components["audio_encoder"].model,
    }


def fake_components() -> dict:
    """The published-size models in the dtypes `load_components` gives them on a GPU, as fake tensors."""
    precision = Precision.for_device("cuda")
    transformer = random_transformer("cpu", precision.transformer)
    apply_attention_backend(transformer, torch.device("cpu"), "native", dtype=precision.transformer)
    return {
        "transformer": transformer,
        "text_encoder": random_text_encoder("cpu", precision.text_encoder),
        "image_encoder": random_image_encoder("cpu", precision.image_encoder),
        "vae": random_vae("cpu", precision.vae),
        "audio_encoder": random_audio_encoder("cpu"),
    }


def measure(cases: Iterable[tuple[str, int, int]] = ACTIVATION_CASES, log=print) -> MemoryPlan:
    started = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        components = fake_components()
        modules = _modules(components)
        weights = {name: _bytes([*m.parameters(), *m.buffers()]) for name, m in modules.items()}
        transformer = transformer_weights(components["transformer"])
        log(f"models built ({time.perf_counter() - started:.0f} s)")
        text, audio = measure_text(components), measure_audio(components)
        clips = {}
        for resolution, speakers, passes in cases:
            clips[f"{resolution}/{speakers}/{passes}"] = measure_clip(components, resolution, speakers, passes)
            log(f"clip {resolution} speakers={speakers} passes={passes}: "
                f"{clips[f'{resolution}/{speakers}/{passes}'] / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    return MemoryPlan(weights=weights, transformer=transformer, text_activation=text, audio_activation=audio,
                      clip_activation=clips)


def markdown(plan: MemoryPlan) -> str:
    lines = ["| resolution | speakers | passes | weights | offload | GPU peak GiB (predicted) | phase | "
             "host GiB (predicted) | text encoder |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case in predicted_cases():
        p = predict(case, plan)
        lines.append(f"| {case.resolution} | {case.speakers} | {case.passes} | {case.weights} | {case.offload} | "
                     f"{p.gpu_peak_bytes / 2**30:.1f} | {p.peak_phase} | {p.host_bytes / 2**30:.1f} | "
                     f"{'CPU' if p.text_encoder_on_cpu else 'GPU'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"measure every case and write {PLAN_PATH.name}")
    args = parser.parse_args(argv)
    if args.write:
        plan = measure(log=lambda message: print(message, file=sys.stderr, flush=True))
        PLAN_PATH.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    print(markdown(MemoryPlan.load()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
