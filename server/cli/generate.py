"""`multitalk generate`: one video from local files, with a progress bar.

The same `Pipeline` the server uses; `--weights tiny` runs the seeded tiny checkpoints (written to
the user cache on first use), which makes random-looking but correctly shaped videos on any CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from model.runtime.execution import OFFLOAD_MODES, WEIGHT_MODES, ExecutionOptions

logger = logging.getLogger("multitalk.generate")


def _box(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x_min,y_min,x_max,y_max in pixels, got {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 numbers x_min,y_min,x_max,y_max, got {text!r}")
    return values  # type: ignore[return-value]


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 448x896, got {text!r}") from None
    return height, width


def add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="make one talking video from an image and speech",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("--image", type=Path, required=True, help="reference image (people: left = first audio)")
    gen.add_argument("--audio", type=Path, required=True, help="first speaker's audio (any common format or a video)")
    gen.add_argument("--audio2", type=Path, help="second speaker's audio")
    gen.add_argument("--prompt", required=True, help="what the video shows")
    gen.add_argument("--out", type=Path, required=True, help="output .mp4")
    gen.add_argument("--num-frames", type=int, default=181, help="frames at 25 fps (41..241)")
    gen.add_argument("--resolution", choices=["480p", "720p"], default="480p")
    gen.add_argument("--seed", type=int, help="default: random (printed)")
    gen.add_argument("--acceleration", choices=["none", "regular", "high"], default="regular")
    gen.add_argument("--use-only-first-audio", action="store_true", help="one speaker even if --audio2 is given")
    gen.add_argument("--weights", default="tiny", help="checkpoint folder, or 'tiny' for the built-in tiny weights")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--lora", type=Path, action="append", default=[], help="extra LoRA file (repeatable)")
    run = gen.add_argument_group("execution (speed and memory; same video up to weight rounding)")
    run.add_argument("--attention", default="auto", help="attention kernel: auto or a diffusers backend name")
    run.add_argument("--weight-storage", choices=WEIGHT_MODES, default="bf16", help="transformer block weights")
    run.add_argument("--offload", choices=OFFLOAD_MODES, default="none",
                     help="blocks: stream the transformer blocks from CPU memory (24 GB GPUs)")
    run.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    run.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                     help="split every step over N GPUs; launch with torchrun --nproc-per-node N")
    ext = gen.add_argument_group("extensions beyond the hosted API")
    ext.add_argument("--audio-mode", choices=["add", "para"], default="add",
                     help="add: speakers take turns (first, then second); para: both tracks play at once")
    ext.add_argument("--speaker-box", type=_box, action="append", dest="speaker_boxes",
                     help="x_min,y_min,x_max,y_max in image pixels, once per speaker in audio order")
    ext.add_argument("--detect-speakers", action="store_true", help="place speakers from detected faces")
    ext.add_argument("--negative-prompt")
    ext.add_argument("--steps", type=int, help="override the preset's sampling steps")
    ext.add_argument("--shift", type=float, help="override the schedule shift")
    ext.add_argument("--text-scale", type=float, help="text guidance (1 = 2-pass guidance)")
    ext.add_argument("--audio-scale", type=float, help="audio guidance")
    ext.add_argument("--apg", action="store_true", help="adaptive projected guidance (less colour drift)")
    ext.add_argument("--teacache-threshold", type=float, help="override the preset's TeaCache threshold")
    ext.add_argument("--color-correction", type=float, default=1.0, help="strength of colour matching (0..1)")
    ext.add_argument("--frame-size", type=_size, help="HEIGHTxWIDTH (multiples of 16) instead of the bucket")
    gen.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from model.contract.errors import GenerationCancelled, InputError
    from model.pipeline import GenerationRequest, Pipeline
    from model.weights.streaming import WeightsError
    from model.weights.tiny import cached_tiny_weights

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rank, output, seed = 0, args.out, args.seed
    if args.sequence_parallel > 1:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.sequence_parallel:
            logger.error("--sequence-parallel %d needs one process per GPU: torchrun --nproc-per-node %d "
                         "(this run has WORLD_SIZE %d)", args.sequence_parallel, args.sequence_parallel, world)
            return 2
        from model.network.sequence_parallel import agreed_seed, join_process_group

        device = join_process_group()
        rank = torch.distributed.get_rank()
        seed = agreed_seed(seed)
        if rank:  # every rank decodes the same video; rank 0 writes it
            output = args.out.with_name(f".{args.out.stem}.rank{rank}.mp4")
    weights = cached_tiny_weights() if args.weights == "tiny" else Path(args.weights)
    audio = [args.audio] + ([args.audio2] if args.audio2 else [])
    request = GenerationRequest(
        image=args.image, audio=audio, prompt=args.prompt, output=output, num_frames=args.num_frames,
        resolution=args.resolution, seed=seed, acceleration=args.acceleration,
        use_only_first_audio=args.use_only_first_audio, audio_mode=args.audio_mode, speaker_boxes=args.speaker_boxes,
        detect_speakers=args.detect_speakers, negative_prompt=args.negative_prompt, steps=args.steps,
        shift=args.shift, text_scale=args.text_scale, audio_scale=args.audio_scale, use_apg=args.apg,
        teacache_threshold=args.teacache_threshold, color_correction_strength=args.color_correction,
        frame_size=args.frame_size,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        execution = ExecutionOptions(attention=args.attention, weights=args.weight_storage, offload=args.offload,
                                     compile=args.compile, sequence_parallel=args.sequence_parallel)
        pipeline = Pipeline.from_weights(weights, device, loras=args.lora, execution=execution)
    except WeightsError as exc:
        logger.error("cannot load weights: %s", exc)
        return 2
    except (ValueError, ImportError) as exc:  # an execution option this machine cannot run
        logger.error("cannot prepare the model: %s", exc)
        return 2
    bar = tqdm(total=0, unit="step", desc="sampling", disable=rank != 0)

    def progress(event) -> None:
        if event.stage != "sampling":
            bar.set_description(event.message)
            return
        if bar.total != event.clips * event.steps:
            bar.reset(total=event.clips * event.steps)
        bar.n = (event.clip - 1) * event.steps + event.step
        bar.set_description(f"clip {event.clip}/{event.clips}")
        bar.refresh()

    try:
        result = pipeline.generate(request, progress)
    except InputError as exc:
        bar.close()
        logger.error("invalid input: %s", exc)
        return 2
    except (GenerationCancelled, KeyboardInterrupt):
        bar.close()
        logger.error("cancelled; nothing written")
        return 130
    bar.close()
    if rank:
        result.video.unlink()
    else:
        print(f"wrote {result.video} ({result.num_frames} frames, {result.width}x{result.height}, seed {result.seed}, "
              f"{result.timings['total_s']:.1f} s; {result.settings})")
    if args.sequence_parallel > 1:
        torch.distributed.destroy_process_group()
    return 0
