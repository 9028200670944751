"""`multitalk generate`: one video from local files (or texts to speak), with a progress bar.

Its inputs are those of the two-person endpoints: `--image`, then each person's speech as an audio file
(`--audio`, `--audio2`: `fal-ai/ai-avatar/multi`) or as a text read in a voice (`--text`, `--text2`,
`--voice`, `--voice2`: `fal-ai/ai-avatar/multi-text`); one person when only the first is given.
The same `Pipeline` the server uses; `--weights tiny` runs the seeded tiny checkpoints (written to
the user cache on first use), which makes random-looking but correctly shaped videos on any CPU.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable

from model.contract.fields import (
    AVATAR_MULTI,
    AVATAR_MULTI_TEXT,
    IMAGE,
    MEDIA_KINDS,
    OPTION_FIELDS,
    SEED,
    SPEAKER_PLACEMENT,
    RequestField,
)
from model.runtime.execution import OFFLOAD_MODES, WEIGHT_MODES, ExecutionOptions

logger = logging.getLogger("multitalk.generate")

# Each person's speech: audio files as the multi endpoint takes them, or texts and voices as multi-text does.
AUDIO_SOURCES = tuple(speaker.audio for speaker in AVATAR_MULTI.speakers)
TEXT_SOURCES = tuple(speaker for speaker in AVATAR_MULTI_TEXT.speakers)
SPEECH_FLAG_FIELDS: tuple[RequestField, ...] = (
    *AUDIO_SOURCES, *(speaker.text for speaker in TEXT_SOURCES), *(speaker.voice for speaker in TEXT_SOURCES))


def _flag_type(spec: RequestField) -> Callable[[str], Any]:
    """The field's own parser, with its reason shown by argparse."""
    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.name  # argparse names it in "invalid <name> value"
    return parse


def add_request_flags(group: argparse._ActionsContainer, spec: RequestField, required: bool | None = None) -> None:
    """One contract field as a flag: local files for the media, the field's type, choices and default.
    `required` overrides the field's own (a person's speech may be an audio file or a text)."""
    limits = f" ({spec.limits})" if spec.limits and not spec.choices else ""
    common = {"dest": spec.name, "help": spec.help + limits}
    required = spec.required if required is None else required
    if spec.kind in MEDIA_KINDS:
        group.add_argument(spec.cli_flag, type=Path, required=required, metavar="FILE", **common)
    elif spec.kind == "bool":
        group.add_argument(spec.cli_flag, action="store_true", **common)
    elif spec.kind == "choice":  # a long list (the voices) is named in the help rather than the usage line
        metavar = spec.name.upper() if len(spec.choices) > 8 else None
        group.add_argument(spec.cli_flag, choices=spec.choices, default=spec.default, metavar=metavar, **common)
    elif spec.kind == "boxes":  # one flag per speaker, in audio order
        group.add_argument(spec.cli_flag, type=_flag_type(spec), action="append", metavar="X_MIN,Y_MIN,X_MAX,Y_MAX",
                           **common)
    else:
        group.add_argument(spec.cli_flag, type=_flag_type(spec), default=spec.default, required=required, **common)


def add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="make one talking video from an image and speech",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_request_flags(gen, IMAGE)
    speech = gen.add_argument_group("speech of person 1 (left) and person 2 (right): audio files, or texts to speak")
    for spec in SPEECH_FLAG_FIELDS:
        add_request_flags(speech, spec, required=False)
    for spec in OPTION_FIELDS:
        if spec.hosted:
            add_request_flags(gen, spec)
    gen.add_argument("--out", type=Path, required=True, help="output .mp4")
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
    for spec in OPTION_FIELDS:
        if not spec.hosted:
            add_request_flags(ext, spec)
    ext.add_argument("--detect-speakers", dest=SPEAKER_PLACEMENT.name, action="store_const", const="faces",
                     help="same as --speaker-placement faces")
    gen.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from model.contract.errors import GenerationCancelled, InputError
    from model.contract.request import GenerationRequest, SpokenText

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
    texts = [SpokenText(getattr(args, s.text.name), getattr(args, s.voice.name), s.text.name, s.voice.name)
             for s in TEXT_SOURCES if getattr(args, s.text.name) is not None]
    request = GenerationRequest.from_inputs(
        {spec.name: getattr(args, spec.name) for spec in (IMAGE, *AUDIO_SOURCES)}, output,
        {**{spec.name: getattr(args, spec.name) for spec in OPTION_FIELDS}, SEED.name: seed}, texts,
    )
    try:  # before the model loads: a typo costs a second, not the minutes of loading 80 GB
        for first, second in ((AUDIO_SOURCES[0], AUDIO_SOURCES[1]), (TEXT_SOURCES[0].text, TEXT_SOURCES[1].text)):
            if getattr(args, second.name) is not None and getattr(args, first.name) is None:
                raise InputError(second.name, f"{second.cli_flag} is person 2's; give person 1's {first.cli_flag} too")
        request.check()
    except InputError as exc:
        logger.error("invalid input: %s", exc)
        return 2
    from model.pipeline import Pipeline
    from model.weights.streaming import WeightsError
    from model.weights.tiny import cached_tiny_weights

    weights = cached_tiny_weights() if args.weights == "tiny" else Path(args.weights)
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
