#!/usr/bin/env python3
"""The GPU proof: in ONE device command of at most 8 minutes, what the 14B model must show on one H100/H200.

Why one command: a session is lent a GPU for 15 minutes of device time, machine start included, so a plan of
several benchmark calls (≈ 20 minutes) never fits. This script measures, in order of value, what decides whether
the server is right and fast on a GPU, and it is built to be cut short:

- every stage has an estimated cost in seconds (`ESTIMATES_S`, per config); before starting one, the script
  checks what is left of `--budget-s` (counted from its first line, so imports count) and records the stage as
  skipped, with the reason, when it would not finish; a watchdog stops a stage still running at the budget's end;
- the JSON (`--out`) is written, atomically, at the start (every stage `pending`) and after every stage, so
  whatever comes back is valid and says how far the run got;
- a stage that fails is recorded with its error, and the next one runs.

Stages, in order (names as in the JSON):
  versions           torch, CUDA, cuDNN, the GPU (name, capability, memory), library versions; the kernel
                     `--attention auto` picks and why each other candidate is unusable; the bf16 matmul rate that
                     the FLOP floor divides by
  attention          each usable attention kernel at the 480p shape (3 guidance passes × 32,928 tokens × 40 heads ×
                     128) and the 720p one (2 × 73,920): seconds, TFLOP/s, error against fp32 on sampled query rows
  dit_none           the 14B DiT with random weights (tools/real_size.py), 2 speakers, 480p (latent 21 × 56 × 112):
                     seconds per `none` step (3 passes) against the FLOP floor, peak memory next to
                     model.runtime.memory_budget's prediction
  dit_lora           the default request's step: 2 passes, a random rank-32 LoRA active as the server runs it
  dit_teacache_skip  the cost of a step that TeaCache skips
  dit_720p           one `none` step (3 passes, 2 speakers) at 720p's largest bucket: seconds and peak memory, the
                     figure the 80 GB target is about
  syncs              host synchronisations per step (torch.cuda.set_sync_debug_mode): the first step (clip set-up
                     included) and a later one, and where they come from
  profile            where a default-request step's time goes: one step under torch.profiler after a warm-up, the
                     device time of its operators in groups (matmuls, attention, copies and casts, the element-wise
                     rest) and the longest ones
  vae                Wan VAE: encode of the 81-frame conditioning video, decode of an 81-frame clip's latent, as
                     the server runs them (TF32 convolutions on a GPU, like the original), in true fp32 and in bf16:
                     seconds and each one's error against true fp32
  encoders           umT5-XXL (512 tokens × 2 prompts), CLIP ViT-H/14 (the reference frame), wav2vec2 (20 s of audio)
  drift              bf16 against fp32 on the first blocks of the 14B architecture with the same weights: max and
                     mean relative error after each block and at the output
  compile            compile_repeated_blocks on the DiT (the default request's step): first step with the compile,
                     compiled seconds per step, speed-up over dit_lora, frames compiled, recompiles after warm-up
  fp8                weights 'fp8' (torchao, Hopper) and 'fp8-storage' on a few blocks: speed and error vs bf16;
                     then bf16 and fp8 under regional compilation, where fp8's activation scaling fuses
  offload            offload='blocks' on a cut-down model: GPU peak, host bytes at start-up (resident growth, torch's
                     pinned allocator), extrapolated to the full depth
  memory             every measured peak next to its prediction, and the prediction for 720p

The top-level `targets` (scripts/benchmark.py's TARGETS) are refreshed at every write. The default request end to
end needs model.pipeline, which decodes audio with librosa (numba) and ffmpeg, none of which travels to the GPU
machine, so it is not run here: its time is estimated from the parts. (librosa itself is imported, because
model.media.audio_input imports it at module level and tools/real_size.py reaches it through the audio encoder; its
numba-backed parts load only when used, and never here.) Where scripts/benchmark.py already measures something, its
function is used (build_transformer, measure, matmul_rate, ensure_lora, clip_inputs, StepClock, environment).

Usage:
    python scripts/gpu_proof.py [--config 14b|tiny] [--device cuda|cpu] [--budget-s 420] [--out gpu_proof.json]
                                [--stages versions,vae,...]   (a later call measures again only what it names)
On the GPU machine: `bash scripts/device_benchmark.sh proof` (it installs the carried wheels, then runs this).
In CI, `--config tiny --device cpu` runs every stage on the seeded tiny models in well under a minute
(tests/tools/test_gpu_proof.py), so the script cannot rot between the sessions that have a GPU.
"""

from __future__ import annotations

import time

_started = time.perf_counter()  # the budget counts from here: the imports below are part of it

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import signal
import statistics
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: benchmark.py, which puts the repo on the path

import numpy as np
import torch
from benchmark import (
    DEFAULTS,
    LORA_NAME,
    RESOLUTION,
    StepClock,
    _table,
    build_transformer,
    check_target,
    clip_inputs,
    ensure_lora,
    environment,
    gigabytes,
    log,
    matmul_rate,
    measure,
    peak_gib,
    release,
    reset_peak,
    synchronize,
    targets_table,
    time_steps,
)
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    dispatch_attention_fn,
)

from model.media.image_input import largest_bucket
from model.network.configs import MULTITALK_14B, TEXT_LEN
from model.runtime.attention_backends import (
    backend_problem,
    choose_attention_backend,
    dtype_problem,
)
from model.runtime.execution import ExecutionOptions, prepare_transformer
from model.runtime.lora import loaded_loras, use_lora
from model.runtime.memory import FP8_MIN_CUDA_CAPABILITY
from model.runtime.pinned_blocks import page_locked_bytes
from model.runtime.tf32 import tf32_disabled
from model.sampling.acceleration import recipe_for
from model.sampling.guidance import GuidanceCombiner, guided_velocity
from model.sampling.long_video import condition_video, plan_clips
from model.sampling.sampler import sample_clip
from model.sampling.schedule import sampling_timesteps
from model.weights.layout import Precision
from model.weights.tiny import build_tiny_components
from tools.flops import latent_grid
from tools.real_size import (
    components_from_tiny,
    random_audio_encoder,
    random_image_encoder,
    random_text_encoder,
    random_transformer,
    random_vae,
)

# The device command: the wheel install, then this script's budget, then its way out (issue 14: at most 8 minutes).
COMMAND_LIMIT_S = 480
WHEEL_INSTALL_S = 30  # pip install of ≈ 10 MB of carried wheels, no network, no byte-compiling (before the script)
EXIT_S = 30  # after the budget: a stage stopped by the watchdog, freeing the models, the last write, the exit
DEFAULT_BUDGET_S = COMMAND_LIMIT_S - WHEEL_INSTALL_S - EXIT_S  # 420 s, from the script's first line
START_S = 30  # within the budget, before the first stage: the interpreter and the imports (torch, diffusers, torchao)

# Seconds each stage is expected to take: on one H200 for 14b (the first run's figures, 2026-12-04, with a margin;
# dit_720p and the compiled fp8 rows reasoned from them), on a 2-core CPU for tiny. A stage starts only if its
# estimate fits in what is left of the budget.
ESTIMATES_S = {
    "14b": {"versions": 5, "attention": 18, "dit_none": 35, "dit_lora": 30, "dit_teacache_skip": 15,
            "dit_720p": 60, "syncs": 20, "profile": 20, "vae": 35, "encoders": 8, "drift": 8, "compile": 55, "fp8": 60,
            "offload": 15, "memory": 1},
    "tiny": {"versions": 1, "attention": 1, "dit_none": 3, "dit_lora": 3, "dit_teacache_skip": 1, "dit_720p": 3,
             "syncs": 1, "profile": 2, "vae": 3, "encoders": 2, "drift": 2, "compile": 10, "fp8": 12, "offload": 2,
             "memory": 1},
}
# Sizes per config: attention shapes (label, frame size, batch = guidance passes), depths of the cut-down models,
# seconds of audio for wav2vec2, and the compile backend (on a CPU, dynamo's tracing and guards without code
# generation: the compile stage's path and counts are exercised in CI, its speed means nothing there).
SIZES = {
    "14b": {"attention": (("480p", DEFAULTS["14b"]["frame_size"], 3), ("720p", (704, 1280), 2)),
            "drift_blocks": 2, "fp8_blocks": 4, "offload_blocks": 4, "audio_s": 20, "compile_backend": "inductor",
            "frame_size_720p": largest_bucket("720p")},
    "tiny": {"attention": (("tiny", DEFAULTS["tiny"]["frame_size"], 3),),
             "drift_blocks": 2, "fp8_blocks": 2, "offload_blocks": 2, "audio_s": 2, "compile_backend": "eager",
             "frame_size_720p": tuple(2 * side for side in DEFAULTS["tiny"]["frame_size"])},
}
# Attention kernels timed (the `auto` order first); `_native_math` only on a CPU: on a GPU it would materialise the
# whole score matrix (hundreds of GB at 480p).
ATTENTION_KERNELS = {
    "cuda": ("_flash_3", "_native_cudnn", "flash", "native", "_native_flash", "_native_efficient", "sage", "xformers"),
    "cpu": ("native", "_native_math", "flash"),
}
ATTENTION_REPEATS = 3
REFERENCE_ROWS = 256  # query rows the fp32 attention reference computes (spread over the sequence)
SPEAKERS = 2  # the default request's


class NotHere(Exception):
    """The stage cannot run on this device or installation: recorded as skipped, with this reason."""


class BudgetExhausted(Exception):
    """Raised by the watchdog in a stage still running when the budget ends."""


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Proof, dict], None]


# ---------------------------------------------------------------------------------------------------------
# What the stages share


class Proof:
    """The run: arguments, device, the JSON being written, and the models that several stages use."""

    def __init__(self, args: argparse.Namespace, stage_names: list[str], workdir: Path):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.config == "14b" else torch.float32  # as scripts/benchmark.py runs them
        self.sizes = SIZES[args.config]
        self.grid = latent_grid(args.frame_size, args.num_frames)
        self.distilled = recipe_for("high", RESOLUTION, [LORA_NAME])  # the default request's step: 2 passes + LoRA
        self.full = recipe_for("none", RESOLUTION)  # 3 passes
        self.memory_metric = ("torch.cuda.max_memory_allocated, reset per case" if self.device.type == "cuda"
                              else "process peak RSS (never reset)")
        self.workdir = workdir  # the random LoRA's file
        self.transformer = None
        self._dit_config: dict | None = None
        estimates = ESTIMATES_S.get(args.config, {})
        self.result: dict[str, Any] = {
            "proof": {"config": args.config, "device": args.device, "budget_s": args.budget_s,
                      "command": "python " + " ".join(sys.argv), "memory_metric": self.memory_metric},
            "stages": {name: {"status": "pending", "estimate_s": estimates.get(name), "result": {}}
                       for name in stage_names},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - _started

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def save(self) -> None:
        """Write the JSON whole, then rename it over the old one: a reader never sees half a file."""
        self.result["proof"].update(elapsed_s=round(self.elapsed(), 1), budget_left_s=round(self.remaining(), 1))
        self.result["targets"] = proof_targets(self.result, self.args)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps(self.result, indent=2, default=str))
        os.replace(partial, out)

    @property
    def dit_config(self) -> dict:
        """The full transformer's config (the cut-down models take it with fewer layers)."""
        if self._dit_config is None:
            if self.args.config == "14b":
                self._dit_config = dict(MULTITALK_14B)
            else:
                tiny = build_transformer(self.args, torch.device("cpu"))
                self._dit_config = type(tiny).extract_init_dict(dict(tiny.config))[0]  # what __init__ takes
        return self._dit_config

    def matmul(self) -> dict:
        """The bf16 (tiny: fp32) matmul rate of this device, measured once: the FLOP floor's denominator."""
        if getattr(self.args, "matmul", None) is None:
            self.args.matmul = matmul_rate(self.device, self.dtype, self.args.gemm_size)
        return self.args.matmul

    def measure(self, transformer, **case: Any) -> dict:
        """scripts/benchmark.py's `measure` at this run's grid (warm-up steps, then timed ones)."""
        self.matmul()
        return measure(transformer, self.args, self.device, self.grid, **case)

    def dit(self, out: dict):
        """The full transformer, built and prepared (default options) on first use; `out` gets the build's figures."""
        if self.transformer is None:
            started = time.perf_counter()
            self.transformer = build_transformer(self.args, self.device)
            backend = prepare_transformer(self.transformer, ExecutionOptions(), self.device)
            out["build"] = {"seconds": time.perf_counter() - started, "attention_backend": backend,
                            "parameters": sum(p.numel() for p in self.transformer.parameters())}
        return self.transformer

    def drop_dit(self) -> None:
        """Free the full transformer and any code compiled for it, so later stages measure their own peaks."""
        self.transformer = None
        torch._dynamo.reset()
        release(self.device)

    @contextlib.contextmanager
    def default_request_lora(self, out: dict):
        """The full transformer with the random lightx2v LoRA (loaded once) active, as the server runs `high`."""
        transformer = self.dit(out)
        if LORA_NAME not in loaded_loras(transformer):
            started = time.perf_counter()
            ensure_lora(transformer, self.args, self.workdir)
            out["lora_load_s"] = time.perf_counter() - started
        use_lora(transformer, LORA_NAME, 1.0)
        try:
            yield transformer
        finally:
            use_lora(transformer, None)

    def cut_down(self, layers: int, dtype: torch.dtype):
        """The full architecture with only `layers` blocks, random weights (the same for the same depth and dtype)."""
        return random_transformer(self.device, dtype, {**self.dit_config, "num_layers": layers}, self.args.seed)

    def encoders(self, names: tuple[str, ...], out: dict) -> dict:
        """Published-size encoders with random weights (tools/real_size.py), or the tiny ones, on the device."""
        started = time.perf_counter()
        if self.args.config == "14b":
            precision = Precision.for_device(self.device)
            makers = {"vae": lambda: random_vae(self.device, precision.vae),
                      "text_encoder": lambda: random_text_encoder(self.device, precision.text_encoder),
                      "image_encoder": lambda: random_image_encoder(self.device, precision.image_encoder),
                      "audio_encoder": lambda: random_audio_encoder(self.device)}
            built = {name: makers[name]() for name in names}
        else:
            components = components_from_tiny(build_tiny_components(self.args.seed), self.device)
            built = {name: getattr(components, name) for name in names}
        out["build_s"] = time.perf_counter() - started
        return built

    def memory_record(self, peak_gib: float, passes: int, offload: str = "none", host_bytes: int | None = None,
                      resolution: str = RESOLUTION) -> dict:
        """A measured peak next to model.runtime.memory_budget's prediction for the same case (the memory stage puts
        them on the same footing); on CUDA also the allocator's reserved peak, which shows its rounding."""
        case = {"resolution": resolution, "speakers": SPEAKERS, "passes": passes, "weights": "bf16", "offload": offload}
        record = {"measured_peak_bytes": round(peak_gib * 2**30), "metric": self.memory_metric,
                  "prediction": predicted_memory(case)}
        if self.device.type == "cuda":
            record["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(self.device)
        if host_bytes is not None:
            record["measured_host_bytes"] = host_bytes
        if self.args.config != "14b":
            record["note"] = "the prediction is the 14B model's; the tiny run only exercises the call"
        return record


def predicted_memory(case: dict) -> dict:
    """model.runtime.memory_budget's prediction for `case`, or the reason there is none: that module is newer than
    this script, and the proof must report a missing or broken prediction instead of stopping."""
    try:
        from model.runtime.memory_budget import MemoryCase, predict

        prediction = predict(MemoryCase(**case))
        return {"case": case, "gpu_peak_bytes": int(prediction.gpu_peak_bytes),
                "host_bytes": int(prediction.host_bytes), "text_encoder_on_cpu": prediction.text_encoder_on_cpu}
    except Exception as error:
        return {"case": case, "error": f"{type(error).__name__}: {error}"}


# ---------------------------------------------------------------------------------------------------------
# Measuring helpers


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn's result and its seconds, with the device synchronised on both sides."""
    synchronize(device)
    started = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - started


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` calls after one warm-up call (device events, no host sync in between), and the
    last output."""
    output = fn()
    clock = StepClock(device)
    synchronize(device)
    clock.mark()
    for _ in range(repeats):
        output = fn()
        clock.mark()
    return statistics.median(clock.seconds()), output


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> dict:
    """max |Δ| / max |ref| and mean |Δ| / mean |ref|, in fp32: scale-free, so one bar fits every tensor (bf16
    rounding alone gives ≈ 4e-3 per element). None when the value is not finite."""
    value, reference = value.float(), reference.float()
    if not bool(torch.isfinite(value).all()):
        return {"max": None, "mean": None, "finite": False}
    diff = (value - reference).abs()
    scale = reference.abs()
    return {"max": float(diff.max() / scale.max()), "mean": float(diff.mean() / scale.mean()), "finite": True}


def first_velocity(transformer, inputs, recipe) -> torch.Tensor:
    """The guided velocity of `recipe`'s first step (one batched forward of its passes), as sample_clip computes it."""
    timestep = sampling_timesteps(recipe.steps, recipe.shift)[:1].to(inputs.noise.device)
    latent_input = torch.cat([inputs.noise[None], inputs.condition], dim=1)
    kwargs = inputs.guidance_inputs.transformer_kwargs(recipe.guidance.text_scale, transformer.dtype)
    return guided_velocity(transformer, latent_input, timestep, kwargs, GuidanceCombiner(recipe.guidance))


def with_block_outputs(transformer, fn: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
    """fn's result and an fp32 copy of what each of the transformer's blocks returned while it ran."""
    outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _module, _inputs, output: outputs.append(output.float()))
             for block in transformer.blocks]
    try:
        return fn(), outputs
    finally:
        for hook in hooks:
            hook.remove()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v in true fp32 for the query rows `rows` of [B, S, H, D] inputs → [B, len(rows), H, D];
    a sample of rows keeps the score matrix to a few GB where the whole one would need hundreds."""
    scale = q.shape[-1] ** -0.5
    out = []
    with tf32_disabled():
        for b in range(q.shape[0]):
            queries = q[b, rows].float().transpose(0, 1)  # [H, R, D]
            keys, values = k[b].float().transpose(0, 1), v[b].float().transpose(0, 1)  # [H, S, D]
            weights = torch.softmax(queries @ keys.transpose(1, 2) * scale, dim=-1)
            out.append((weights @ values).transpose(0, 1))
    return torch.stack(out)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def dynamo_counts() -> dict:
    """torch._dynamo's running totals: frames compiled (each compile and recompile of a frame), graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": [reason[:200] for reason, _ in counters["graph_break"].most_common(5)]}


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pinned_allocator_bytes(device: torch.device) -> int | None:
    """Bytes torch's pinned host allocator holds (each block rounded up to a power of two; memory pinned in place
    with cudaHostRegister is not in it); None without CUDA or where torch has no such statistics."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if device.type != "cuda" or stats is None:
        return None
    return int(stats().get("allocated_bytes.current", 0))


def resident_bytes() -> int:
    """The process's resident memory now (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------------------------------
# Stages


def stage_versions(proof: Proof, out: dict) -> None:
    device = proof.device
    if device.type == "cuda":  # before anything is allocated: what the driver, the context and the libraries take
        free, total = torch.cuda.mem_get_info(device)
        out["cuda_context_bytes"] = total - free - torch.cuda.memory_reserved(device)
    out["environment"] = environment(proof.args, device)
    out["libraries"] = {name: package_version(name) for name in ("peft", "accelerate", "safetensors", "torchao",
                                                                 "triton", "ftfy")}
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                      "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
        out["fp8_matmuls"] = torch.cuda.get_device_capability(device) >= FP8_MIN_CUDA_CAPABILITY
    out["attention_auto"] = choose_attention_backend(device, "auto", dtype=proof.dtype)
    out["attention_candidates"] = {
        name: backend_problem(name, device) or dtype_problem(name, proof.dtype) or "usable"
        for name in ATTENTION_KERNELS[device.type]}
    out["matmul"] = proof.matmul()
    out["headline"] = (f"{out['environment']['device']}, torch {torch.__version__}, CUDA {out['cuda']}, cuDNN "
                       f"{out['cudnn']}; attention auto → {out['attention_auto']}; matmul "
                       f"{out['matmul']['tflops']:.3g} TFLOP/s")


def stage_attention(proof: Proof, out: dict) -> None:
    device, config = proof.device, proof.dit_config
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    rows = out.setdefault("rows", [])
    for label, frame_size, batch in proof.sizes["attention"]:
        frames, height, width = latent_grid(frame_size, proof.args.num_frames)
        tokens = frames * (height // 2) * (width // 2)
        generator = torch.Generator(device).manual_seed(proof.args.seed)
        q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=torch.bfloat16,
                               generator=generator) for _ in range(3))
        sample = torch.linspace(0, tokens - 1, min(tokens, REFERENCE_ROWS), device=device).long()
        reference = attention_reference(q, k, v, sample)
        for name in ATTENTION_KERNELS[device.type]:
            rows.append({"shape": label, **attention_row(name, q, k, v, sample, reference)})
            proof.save()
        del q, k, v, reference
        release(device)
    fastest: dict[str, dict] = {}
    for row in rows:
        if row["status"] == "ok" and row["s_per_call"] < fastest.get(row["shape"], {"s_per_call": float("inf")})["s_per_call"]:
            fastest[row["shape"]] = row
    out["headline"] = "; ".join(f"{shape}: {row['kernel']} {row['s_per_call'] * 1e3:.3g} ms"
                                for shape, row in fastest.items())


def attention_row(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sample: torch.Tensor,
                  reference: torch.Tensor) -> dict:
    """One kernel on [B, S, H, D] bf16 inputs: median seconds, TFLOP/s and error on the sampled query rows against
    the fp32 reference, or why it cannot run here."""
    batch, tokens, heads, head_dim = q.shape
    row = {"kernel": name, "batch": batch, "tokens": tokens, "heads": heads, "head_dim": head_dim}
    problem = backend_problem(name, q.device) or dtype_problem(name, q.dtype)
    if problem:
        return {**row, "status": "unavailable", "note": problem}
    try:
        call = functools.partial(dispatch_attention_fn, q, k, v, backend=AttentionBackendName(name))
        seconds, output = time_calls(call, q.device, ATTENTION_REPEATS)
    except Exception as error:
        return {**row, "status": "failed", "note": f"{type(error).__name__}: {str(error)[:300]}"}
    flops = 4 * batch * heads * tokens**2 * head_dim
    return {**row, "status": "ok", "s_per_call": seconds, "tflops": flops / seconds / 1e12,
            "error_vs_fp32": relative_error(output[:, sample], reference)}


def stage_dit_none(proof: Proof, out: dict) -> None:
    transformer = proof.dit(out)
    case = proof.measure(transformer, speakers=SPEAKERS, guidance=proof.full.guidance, shift=proof.full.shift)
    out.update(case, recipe=proof.full.describe(), memory=proof.memory_record(case["peak_memory_gib"], passes=3))
    out["headline"] = (f"{case['s_per_step']:.3g} s/step, {case['ratio_to_floor']:.3g}× floor, "
                       f"peak {gigabytes(case['peak_memory_gib']):.3g} GB")


def stage_dit_lora(proof: Proof, out: dict) -> None:
    recipe = proof.distilled
    with proof.default_request_lora(out) as transformer:
        case = proof.measure(transformer, speakers=SPEAKERS, guidance=recipe.guidance, shift=recipe.shift,
                             lora_rank=proof.args.lora_rank)
    out.update(case, recipe=recipe.describe(), memory=proof.memory_record(case["peak_memory_gib"], passes=2))
    out["headline"] = (f"{case['s_per_step']:.3g} s/step, {case['ratio_to_floor']:.3g}× floor, "
                       f"peak {gigabytes(case['peak_memory_gib']):.3g} GB")


def stage_dit_teacache_skip(proof: Proof, out: dict) -> None:
    """TeaCache's presets run the 3-pass recipe: the warm-up step computes, the timed one replays the residual."""
    case = proof.measure(proof.dit(out), speakers=SPEAKERS, guidance=proof.full.guidance, shift=proof.full.shift,
                         teacache_skip=True)
    out.update(case)
    out["headline"] = f"{case['s_per_step']:.3g} s per skipped step"


def stage_dit_720p(proof: Proof, out: dict) -> None:
    """One `none` step at 720p's largest bucket: the peak the 80 GB target is about (one step: at tens of seconds a
    step, what a warm-up would change is far below what the target looks for; its time includes kernel choice)."""
    frame_size = proof.sizes["frame_size_720p"]
    grid = latent_grid(frame_size, proof.args.num_frames)
    proof.matmul()
    args = argparse.Namespace(**{**vars(proof.args), "warmup": 0, "steps_measured": 1})
    case = measure(proof.dit(out), args, proof.device, grid, speakers=SPEAKERS, guidance=proof.full.guidance,
                   shift=proof.full.shift)
    out.update(case, frame_size=list(frame_size), tokens=grid[0] * (grid[1] // 2) * (grid[2] // 2),
               memory=proof.memory_record(case["peak_memory_gib"], passes=3, resolution="720p"))
    out["headline"] = (f"{case['s_per_step']:.3g} s/step (first), {case['ratio_to_floor']:.3g}× floor, "
                       f"peak {gigabytes(case['peak_memory_gib']):.3g} GB at {frame_size[0]}×{frame_size[1]}")


def stage_syncs(proof: Proof, out: dict) -> None:
    """Every host synchronisation stalls the GPU's queue; the step loop is meant to have none after the first step."""
    device = proof.device
    if device.type != "cuda":
        raise NotHere("host synchronisations are counted by torch.cuda.set_sync_debug_mode: CUDA only")
    recipe = proof.distilled
    with proof.default_request_lora(out) as transformer:
        inputs = clip_inputs(transformer, proof.grid, SPEAKERS, device, proof.args.seed)

        def two_steps(on_step: Callable[..., None]) -> None:  # the first step also sets the clip up
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                sample_clip(transformer, inputs, sampling_timesteps(2, recipe.shift), recipe.guidance, on_step=on_step)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        out.update(count_syncs(two_steps))
    out["headline"] = f"syncs per step: {out['per_step']} (the first includes the clip's set-up)"


# Operator groups of the profile stage, by aten name (what is neither is element-wise work: norms, modulation, RoPE,
# activations, the guidance combination).
PROFILE_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm"),
    "attention": ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                  "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
                  "aten::_efficient_attention_forward", "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "copy": ("aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::gather", "aten::fill_",
             "aten::zero_"),
}
PROFILE_TOP = 15


def stage_profile(proof: Proof, out: dict) -> None:
    """One default-request step under torch.profiler, after a warm-up step: each operator's own device time (CPU time
    on a CPU), in PROFILE_GROUPS and the longest PROFILE_TOP, so the next optimisation aims at what is measured."""
    from torch.profiler import ProfilerActivity, profile

    device, recipe = proof.device, proof.distilled
    cuda = device.type == "cuda"
    with proof.default_request_lora(out) as transformer:
        inputs = clip_inputs(transformer, proof.grid, SPEAKERS, device, proof.args.seed)
        time_steps(transformer, inputs, 1, recipe.shift, recipe.guidance, device)  # warm-up
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities) as profiler:
            step_s = time_steps(transformer, inputs, 1, recipe.shift, recipe.guidance, device)[0]
    out.update(operator_times(profiler.key_averages(), cuda), step_s=step_s)
    groups = ", ".join(f"{name} {seconds:.3g} s" for name, seconds in out["groups_s"].items())
    out["headline"] = f"{step_s:.3g} s step (profiled): {groups}"


def operator_times(events, cuda: bool) -> dict:
    """Seconds of each operator's own work (its kernels' device time on CUDA, its CPU time on a CPU), grouped."""
    times = {event.key: (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
             for event in events}
    groups = dict.fromkeys((*PROFILE_GROUPS, "element-wise and other"), 0.0)
    for name, seconds in times.items():
        group = next((group for group, names in PROFILE_GROUPS.items() if name in names), "element-wise and other")
        groups[group] += seconds
    top = sorted(times.items(), key=lambda item: item[1], reverse=True)[:PROFILE_TOP]
    return {"groups_s": groups, "top_s": dict(top), "clock": "device" if cuda else "cpu"}


def count_syncs(run: Callable[[Callable[..., None]], None]) -> dict:
    """Host synchronisations in each step of `run(on_step)`, which runs steps (calling on_step after each) under
    torch.cuda.set_sync_debug_mode("warn"): torch then warns at every synchronising call. Also where the ten most
    frequent come from (the Python line that made the call)."""
    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(lambda *_: marks.append(len(caught)))
    is_sync = ["synchronizing" in str(w.message).lower() for w in caught]
    counts = [sum(is_sync[:mark]) for mark in marks]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w, sync in zip(caught, is_sync) if sync)
    return {"per_step": [b - a for a, b in zip([0, *counts], counts)], "where": dict(where.most_common(10))}


def stage_vae(proof: Proof, out: dict) -> None:
    """Encode of the 81-frame conditioning video and decode of an 81-frame latent: as the server runs them (torch's
    TF32 flags as they are: on a GPU, TF32 convolutions, like the original), in true fp32 (the reference), in bf16."""
    device, (height, width) = proof.device, proof.args.frame_size
    reset_peak(device)
    vae = proof.encoders(("vae",), out)["vae"]
    out["weights_bytes"] = {"vae": parameter_bytes(vae.vae)}
    generator = torch.Generator(device).manual_seed(proof.args.seed)
    image = torch.rand(1, 3, 1, height, width, device=device, generator=generator) * 2 - 1
    conditioning = condition_video(image, proof.args.num_frames)
    noise = torch.randn(1, vae.vae.config.z_dim, *proof.grid, device=device, generator=generator)
    with tf32_disabled():
        reference = vae_round_trip(vae, image, conditioning, noise)
    served = vae_round_trip(vae, image, conditioning, noise)
    out.update(encode_s=served["encode_s"], decode_s=served["decode_s"], frames=served["video"].shape[2],
               latent_shape=list(served["latents"].shape), dtype=str(vae.vae.dtype), peak_memory_gib=peak_gib(device))
    vae.vae.to(torch.bfloat16)
    variants = {"served": served, "fp32": reference, "bf16": vae_round_trip(vae, image, conditioning, noise)}
    out["variants"] = {name: {"encode_s": run["encode_s"], "decode_s": run["decode_s"],
                              "encode_error_vs_fp32": relative_error(run["latents"], reference["latents"]),
                              "decode_error_vs_fp32": relative_error(run["video"], reference["video"])}
                       for name, run in variants.items()}
    out["headline"] = "; ".join(_vae_summary(name, row) for name, row in out["variants"].items()) + (
        f" ({out['frames']} frames)")


def _vae_summary(name: str, row: dict) -> str:
    error = "" if name == "fp32" else f" (decode error max {_rel(row['decode_error_vs_fp32']['max'])})"
    return f"{name} {row['encode_s']:.3g} + {row['decode_s']:.3g} s{error}"


def vae_round_trip(vae, image: torch.Tensor, conditioning: torch.Tensor, noise: torch.Tensor) -> dict:
    """WanVAE's encode of `conditioning` and decode of `noise`, timed, after a 5-frame warm-up: the causal VAE works
    frame by frame, so the kernels of the long clip (for the flags and dtype in force) are picked there."""
    device = noise.device
    vae.decode(vae.encode(condition_video(image, 5)))
    latents, encode_s = timed(lambda: vae.encode(conditioning), device)
    video, decode_s = timed(lambda: vae.decode(noise), device)
    return {"latents": latents, "video": video, "encode_s": encode_s, "decode_s": decode_s}


def stage_encoders(proof: Proof, out: dict) -> None:
    device, (height, width), seed = proof.device, proof.args.frame_size, proof.args.seed
    reset_peak(device)
    built = proof.encoders(("text_encoder", "image_encoder", "audio_encoder"), out)
    text, image, audio = built["text_encoder"], built["image_encoder"], built["audio_encoder"]
    out["weights_bytes"] = {name: parameter_bytes(encoder.model) for name, encoder in built.items()}
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, text.model.config.vocab_size, (2, TEXT_LEN), generator=generator)  # prompt + negative
    frame = torch.rand(1, 3, 1, height, width, generator=generator) * 2 - 1
    rate = audio.feature_extractor.sampling_rate
    speech = (np.random.default_rng(seed).standard_normal(proof.sizes["audio_s"] * rate) * 0.1).astype(np.float32)
    work = {"umt5": lambda: text.encode_ids(ids, torch.ones_like(ids)), "clip": lambda: image.encode(frame),
            "wav2vec2": lambda: audio.encode(speech, rate)}
    for name, fn in work.items():
        fn()  # warm-up
        _, out[f"{name}_s"] = timed(fn, device)
    out.update(text_tokens=list(ids.shape), audio_s=proof.sizes["audio_s"], peak_memory_gib=peak_gib(device))
    out["headline"] = ", ".join(f"{name} {out[f'{name}_s'] * 1e3:.3g} ms" for name in work)


def stage_drift(proof: Proof, out: dict) -> None:
    """What bf16 costs in accuracy, block by block: the same weights in fp32 (true fp32, no TF32) and in bf16."""
    device, layers = proof.device, proof.sizes["drift_blocks"]
    reference = proof.cut_down(layers, torch.float32)
    low = proof.cut_down(layers, torch.bfloat16)
    low.load_state_dict(reference.state_dict())  # the same values, each rounded once to its parameter's dtype
    inputs = clip_inputs(reference, proof.grid, SPEAKERS, device, proof.args.seed)
    results = {}
    for name, model in (("fp32", reference), ("bf16", low)):
        out[f"attention_{name}"] = prepare_transformer(model, ExecutionOptions(), device)
        with tf32_disabled() if name == "fp32" else contextlib.nullcontext():
            results[name] = with_block_outputs(model, lambda model=model: first_velocity(model, inputs, proof.distilled))
    out["blocks"] = [relative_error(value, ref) for ref, value in zip(results["fp32"][1], results["bf16"][1])]
    out["output"] = relative_error(results["bf16"][0], results["fp32"][0])
    out.update(layers=layers, passes=len(proof.distilled.guidance.pass_names))
    out["headline"] = (f"output max {_rel(out['output']['max'])}, mean {_rel(out['output']['mean'])} "
                       f"after {layers} blocks")


def stage_compile(proof: Proof, out: dict) -> None:
    """Regional compilation as the server's `compile` option does it, on the default request's step."""
    recipe, args = proof.distilled, proof.args
    try:
        with proof.default_request_lora(out) as transformer:
            before = dynamo_counts()
            out["first_step_s"] = compile_and_take_a_step(proof, transformer)
            warm = dynamo_counts()
            case = proof.measure(transformer, speakers=SPEAKERS, guidance=recipe.guidance, shift=recipe.shift,
                                 lora_rank=args.lora_rank)
            after = dynamo_counts()
    finally:
        proof.drop_dit()  # compiled: no later stage may take it for the eager model
    eager = proof.result["stages"].get("dit_lora", {}).get("result", {}).get("s_per_step")
    out.update(case, backend=proof.sizes["compile_backend"],
               frames_compiled_in_warmup=warm["frames_compiled"] - before["frames_compiled"],
               recompiles_after_warmup=after["frames_compiled"] - warm["frames_compiled"],
               graphs=after["graphs"] - before["graphs"], graph_breaks=after["graph_breaks"] - before["graph_breaks"],
               graph_break_reasons=after["graph_break_reasons"],
               speedup_over_eager=eager / case["s_per_step"] if eager else None)
    out["headline"] = (f"{case['s_per_step']:.3g} s/step compiled (first step {out['first_step_s']:.3g} s), "
                       f"{out['recompiles_after_warmup']} recompiles after warm-up, {out['graph_breaks']} graph breaks")


def stage_fp8(proof: Proof, out: dict) -> None:
    proof.drop_dit()
    device, layers, recipe = proof.device, proof.sizes["fp8_blocks"], proof.distilled
    rows = out.setdefault("rows", [])
    reference: tuple[float, torch.Tensor] | None = None  # bf16's seconds per step and velocity
    for weights in ("bf16", "fp8", "fp8-storage"):
        row: dict[str, Any] = {"weights": weights, "layers": layers}
        model = proof.cut_down(layers, torch.bfloat16)
        try:
            prepare_transformer(model, ExecutionOptions(weights=weights), device)
        except Exception as error:
            row.update(status="unavailable", note=f"{type(error).__name__}: {error}")
        else:
            row.update(proof.measure(model, speakers=SPEAKERS, guidance=recipe.guidance, shift=recipe.shift),
                       status="ok")
            velocity = first_velocity(model, clip_inputs(model, proof.grid, SPEAKERS, device, proof.args.seed), recipe)
            if reference is None:
                reference = (row["s_per_step"], velocity)
            else:
                row.update(error_vs_bf16=relative_error(velocity, reference[1]),
                           speedup_over_bf16=reference[0] / row["s_per_step"])
        rows.append(row)
        proof.save()
        del model
        release(device)
    for weights in ("bf16", "fp8"):  # compiled: inductor fuses fp8's per-token scaling into the neighbouring kernels
        rows.append(compiled_weights_row(proof, weights, layers))
        proof.save()
        release(device)
    out["headline"] = "; ".join(_weights_summary(row) for row in rows)


def compile_and_take_a_step(proof: Proof, transformer) -> float:
    """compile_repeated_blocks as the server's `compile` does it, then the seconds of the default request's first
    step, which compiles the blocks."""
    recipe, device = proof.distilled, proof.device
    transformer.compile_repeated_blocks(backend=proof.sizes["compile_backend"])
    inputs = clip_inputs(transformer, proof.grid, SPEAKERS, device, proof.args.seed)
    return time_steps(transformer, inputs, 1, recipe.shift, recipe.guidance, device)[0]


def compiled_weights_row(proof: Proof, weights: str, layers: int) -> dict:
    """`weights` under compile_repeated_blocks on the cut-down model: seconds per step after the compiling step."""
    device, recipe = proof.device, proof.distilled
    row: dict[str, Any] = {"weights": f"{weights}+compile", "layers": layers}
    model = proof.cut_down(layers, torch.bfloat16)
    try:
        prepare_transformer(model, ExecutionOptions(weights=weights), device)
    except Exception as error:
        return {**row, "status": "unavailable", "note": f"{type(error).__name__}: {error}"}
    try:
        row["first_step_s"] = compile_and_take_a_step(proof, model)
        row.update(proof.measure(model, speakers=SPEAKERS, guidance=recipe.guidance, shift=recipe.shift), status="ok")
    finally:
        del model
        torch._dynamo.reset()
    return row


def _weights_summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['weights']} {row['status']}"
    error = f", error max {_rel(row['error_vs_bf16']['max'])}" if "error_vs_bf16" in row else ""
    return f"{row['weights']} {row['s_per_step']:.3g} s/step{error}"


def stage_offload(proof: Proof, out: dict) -> None:
    proof.drop_dit()
    device, layers, recipe = proof.device, proof.sizes["offload_blocks"], proof.distilled
    # Made on the device (fast), then kept on the host, where the loader puts a transformer that will be offloaded.
    model = proof.cut_down(layers, proof.dtype).to("cpu")
    release(device)
    block_bytes = parameter_bytes(model.blocks)
    pinned, resident = pinned_allocator_bytes(device), resident_bytes()
    reset_peak(device)
    prepare_transformer(model, ExecutionOptions(offload="blocks"), device)
    growth = resident_bytes() - resident  # what offloading added on the host at start-up: pinned copies, if any
    pinned = None if pinned is None else pinned_allocator_bytes(device) - pinned
    page_locked = page_locked_bytes()  # the blocks' buffers, registered in place (what /metrics adds to `pinned`)
    case = proof.measure(model, speakers=SPEAKERS, guidance=recipe.guidance, shift=recipe.shift)
    full = proof.dit_config["num_layers"]
    host = (block_bytes + growth) * full // layers  # the blocks' host bytes at the full depth
    out.update(case, layers=layers, block_parameter_bytes=block_bytes, host_resident_growth_bytes=growth,
               pinned_allocator_bytes=pinned, page_locked_block_bytes=page_locked, offloaded_host_bytes_at_full_depth=host,
               memory=proof.memory_record(case["peak_memory_gib"], passes=2, offload="blocks", host_bytes=host))
    out["headline"] = (f"{case['s_per_step']:.3g} s/step, GPU peak {gigabytes(case['peak_memory_gib']):.3g} GB, "
                       f"blocks on the host {host / 1e9:.3g} GB at {full} blocks")


def stage_memory(proof: Proof, out: dict) -> None:
    """Each measured peak next to its prediction. The prediction is the whole request's on an 80 GB GPU (the models
    resident there, the CUDA context, the allocator's margin), the measurement the transformer's step alone: the
    step's peak plus the weights of the encoders the prediction keeps on the GPU (umT5 only where it does not keep it
    in CPU memory; measured in the vae and encoders stages) plus the context (versions) is the measured whole."""
    stages = {name: entry["result"] for name, entry in proof.result["stages"].items()}
    weights = {**stages.get("vae", {}).get("weights_bytes", {}), **stages.get("encoders", {}).get("weights_bytes", {})}
    context = stages.get("versions", {}).get("cuda_context_bytes")
    out["rows"] = []
    for name, result in stages.items():
        if "memory" not in result:
            continue
        row = {"stage": name, **result["memory"]}
        predicted = row["prediction"].get("gpu_peak_bytes")
        if predicted and len(weights) == 4 and context is not None and row["prediction"]["case"]["offload"] == "none":
            resident = {name: size for name, size in weights.items()
                        if not (name == "text_encoder" and row["prediction"].get("text_encoder_on_cpu"))}
            row["encoders_counted"] = sorted(resident)
            row["measured_whole_request_bytes"] = row["measured_peak_bytes"] + sum(resident.values()) + context
            row["measured_over_predicted"] = row["measured_whole_request_bytes"] / predicted
        out["rows"].append(row)
    out["predicted_720p"] = predicted_memory({"resolution": "720p", "speakers": SPEAKERS, "passes": 3,
                                              "weights": "bf16", "offload": "none"})
    ratios = [f"{r['stage']} {r['measured_over_predicted']:.3g}" for r in out["rows"] if "measured_over_predicted" in r]
    out["headline"] = f"{len(out['rows'])} measured peaks; measured/predicted: {', '.join(ratios) or 'n/a'}"


STAGES = (
    Stage("versions", stage_versions), Stage("attention", stage_attention), Stage("dit_none", stage_dit_none),
    Stage("dit_lora", stage_dit_lora), Stage("dit_teacache_skip", stage_dit_teacache_skip),
    Stage("dit_720p", stage_dit_720p), Stage("syncs", stage_syncs), Stage("profile", stage_profile),
    Stage("vae", stage_vae),
    Stage("encoders", stage_encoders),
    Stage("drift", stage_drift), Stage("compile", stage_compile), Stage("fp8", stage_fp8),
    Stage("offload", stage_offload), Stage("memory", stage_memory),
)


def _rel(value: float | None) -> str:
    return "—" if value is None else f"{value:.2e}"


# ---------------------------------------------------------------------------------------------------------
# Running


@contextlib.contextmanager
def watchdog(seconds: float):
    """Raise BudgetExhausted in the body after `seconds`: a stage that overruns its estimate still ends with the
    budget, so the device command ends in time and the JSON says what happened."""

    def stop(_signum, _frame):
        raise BudgetExhausted(f"stopped at the end of the budget, {seconds:.0f} s into the stage")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_stages(proof: Proof, stages: tuple[Stage, ...], estimates: dict[str, float]) -> None:
    """Each stage in turn, if its estimate fits in the budget left; the JSON is written before and after each."""
    for stage in stages:
        entry = proof.result["stages"][stage.name]
        left, needed = proof.remaining(), estimates[stage.name]
        if needed > left:
            entry.update(status="skipped", reason=f"needs ≈ {needed:g} s, {max(left, 0):.0f} s of the budget left")
            log(f"{stage.name}: skipped ({entry['reason']})")
            proof.save()
            continue
        entry["status"] = "running"
        proof.save()
        log(f"{stage.name}: running (≈ {needed:g} s, {left:.0f} s left)")
        started = time.perf_counter()
        try:
            with watchdog(left):
                stage.run(proof, entry["result"])
            entry["status"] = "done"
        except NotHere as reason:
            entry.update(status="skipped", reason=str(reason))
        except Exception as error:
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000],
                         traceback=traceback.format_exc()[-4000:])
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 2)
            release(proof.device)
            proof.save()
            detail = entry["result"].get("headline") or entry.get("reason") or entry.get("error", "")
            log(f"{stage.name}: {entry['status']} in {entry['seconds']:.1f} s: {detail[:300]}")


def proof_targets(result: dict, args: argparse.Namespace) -> list[dict]:
    """The issue's targets with what this run measured for them (scripts/benchmark.py's TARGETS and check_target)."""
    stages = {name: entry["result"] for name, entry in result["stages"].items()}
    none, lora, offload = stages.get("dit_none", {}), stages.get("dit_lora", {}), stages.get("offload", {})
    vae, encoders = stages.get("vae", {}), stages.get("encoders", {})
    e2e_note = "not run by the proof (the pipeline decodes audio with librosa, numba and ffmpeg)"
    parts = (lora.get("s_per_step"), vae.get("encode_s"), vae.get("decode_s"), encoders.get("clip_s"),
             encoders.get("umt5_s"), encoders.get("wav2vec2_s"))
    if None not in parts:
        step, encode, decode, clip, umt5, wav2vec2 = parts
        clips, steps = len(plan_clips(args.e2e_frames)), recipe_for("high", RESOLUTION, [LORA_NAME]).steps
        estimate = clips * (steps * step + encode + decode + clip) + umt5 + SPEAKERS * wav2vec2
        e2e_note += f"; from the parts: ≈ {estimate:.3g} s ({clips} clip(s) × {steps} steps + VAE + encoders)"
    layers = offload.get("layers")
    host = offload.get("offloaded_host_bytes_at_full_depth")
    offload_note = "offload stage not run" if layers is None else f"offload stage, {layers}-block model"
    memory = {row["stage"]: row for row in stages.get("memory", {}).get("rows", [])}
    peak_480p, peak_note = whole_request_peak(memory, stages, "dit_none")
    peak_720p, note_720p = whole_request_peak(memory, stages, "dit_720p")
    predicted_720p = stages.get("memory", {}).get("predicted_720p", {}).get("gpu_peak_bytes")
    if predicted_720p:
        note_720p += f"; predicted {predicted_720p / 1e9:.3g} GB"
    return [
        check_target("none_ratio_to_floor", none.get("ratio_to_floor"), args.config, "dit_none, 2 speakers"),
        check_target("e2e_high_s", None, args.config, e2e_note),
        check_target("peak_gb_480p", peak_480p, args.config, peak_note),
        check_target("peak_gb_720p", peak_720p, args.config, note_720p),
        check_target("offload_gpu_gb_480p", gigabytes(offload.get("peak_memory_gib")), args.config,
                     f"{offload_note} (the GPU holds two blocks at a time at any depth)"),
        check_target("offload_host_gb_480p", None if host is None else host / 1e9, args.config,
                     f"{offload_note}: the blocks' host bytes at the full depth (the process adds umT5 and its own)"),
    ]


def whole_request_peak(memory: dict, stages: dict, stage: str) -> tuple[float | None, str]:
    """GB and where from: the memory stage's whole request for `stage` where it has one, else the step alone."""
    row = memory.get(stage, {})
    if "measured_whole_request_bytes" in row:
        encoders = ", ".join(row["encoders_counted"])
        return row["measured_whole_request_bytes"] / 1e9, f"{stage}'s step + {encoders} + the CUDA context"
    peak = stages.get(stage, {}).get("peak_memory_gib")
    if peak is None:
        return None, f"{stage} not run"
    return gigabytes(peak), f"{stage}: the transformer's step alone"


def summary(result: dict) -> str:
    """Markdown for the end of the log (the device tool returns the output's tail): stages, then targets."""
    run = result["proof"]
    lines = [f"GPU proof, config {run['config']} on {run['device']}: {run['elapsed_s']} s of {run['budget_s']:g} s.", ""]
    lines += _table(["stage", "status", "s", "result"], [
        [name, entry["status"], entry.get("seconds", "—"),
         (entry["result"].get("headline") or entry.get("reason") or entry.get("error") or "")[:200]]
        for name, entry in result["stages"].items()])
    return "\n".join(lines + targets_table(result["targets"]))


def stage_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - {stage.name for stage in STAGES})
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stages {unknown}; choose from {[stage.name for stage in STAGES]}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(ESTIMATES_S), default="14b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds from the script's start (default {DEFAULT_BUDGET_S}: an 8-minute device "
                             "command less the wheel install and the exit)")
    parser.add_argument("--out", type=Path, default=Path("gpu_proof.json"), help="JSON, rewritten after every stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", type=stage_list, default=[stage.name for stage in STAGES],
                        help="comma-separated stages to run, in the script's order (default: all)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS[args.config]
    # The fields scripts/benchmark.py's functions read; one timed step after one warm-up: at seconds per step on a
    # GPU, the spread between steps is far below what the proof looks for.
    args.frame_size, args.num_frames, args.e2e_frames = defaults["frame_size"], defaults["num_frames"], defaults["e2e_frames"]
    args.gemm_size, args.lora_rank = defaults["gemm"], defaults["lora_rank"]
    args.warmup, args.steps_measured, args.matmul = 1, 1, None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here (use --device cpu --config tiny)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="multitalk-proof-") as workdir:
        stages = tuple(stage for stage in STAGES if stage.name in args.stages)
        proof = Proof(args, [stage.name for stage in stages], Path(workdir))
        proof.save()
        try:
            run_stages(proof, stages, ESTIMATES_S[args.config])
        finally:
            proof.drop_dit()
            proof.save()
    print(summary(proof.result))
    return 1 if any(entry["status"] == "failed" for entry in proof.result["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
