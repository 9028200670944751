"""`multitalk weights download`: fetch a layout (and distilled LoRAs) into a weights folder, then check it.

The heavy imports happen inside the handler, as everywhere in the CLI; a dry run never imports torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model.weights.manifest import LAYOUTS, LORAS


def add_download_parser(weights) -> None:
    """Register `download` under the `weights` subcommand."""
    parser = weights.add_parser(
        "download", help="download a layout from the Hugging Face Hub, verified and resumable",
        description="Fetch every file a layout needs into DIR, where the loader finds it (no manual copying or "
                    "linking). Honours HF_TOKEN, HF_ENDPOINT and files already in the HF cache (HF_HOME).",
    )
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="multitalk", help="which published layout")
    parser.add_argument("--dir", type=Path, default=Path("weights"), help="weights folder (default: weights/)")
    parser.add_argument("--with-lora", action="append", default=[], choices=sorted(LORAS), metavar="NAME",
                        help=f"also fetch a distilled LoRA into DIR/loras ({', '.join(sorted(LORAS))}); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="list the files, sizes and total; download nothing")
    parser.set_defaults(handler=_download)


def _download(args: argparse.Namespace) -> int:
    from model.weights.download import DownloadError

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    try:
        return _dry_run(args) if args.dry_run else _fetch_and_check(args)
    except DownloadError as exc:
        print(f"error: {exc}")
        return 1


def _dry_run(args: argparse.Namespace) -> int:
    from model.weights.download import fill_sizes, hub_endpoint, human_size, pending_bytes, plan_download

    plan = fill_sizes(plan_download(args.layout, args.dir, args.with_lora))
    pending = pending_bytes(plan, args.dir)
    known = all(item.size is not None for item in plan)
    print(f"layout {args.layout} into {args.dir} — sizes "
          + (f"from {hub_endpoint()}" if known else f"unknown ({hub_endpoint()} not reachable)"))
    source = None
    for item, left in zip(plan, pending):
        if (item.repo_id, item.revision) != source:
            source = (item.repo_id, item.revision)
            print(f"{item.repo_id} @ {item.revision}")
        size = "?" if item.size is None else human_size(item.size)
        place = item.local_path.relative_to(args.dir).as_posix()
        origin = "" if place.endswith(item.filename) else f"  (from {item.filename})"
        note = "  (nothing to download)" if left == 0 else ""
        print(f"  {size:>10}  {place}{origin}{note}")
    total = human_size(sum(item.size for item in plan)) if known else "?"
    to_fetch = human_size(sum(pending)) if None not in pending else "?"
    print(f"total: {len(plan)} files, {total}; still to download: {to_fetch}")
    return 0


def _fetch_and_check(args: argparse.Namespace) -> int:
    from model.weights.download import download_weights

    outcome = download_weights(args.layout, args.dir, args.with_lora)
    counts: dict[str, int] = {}
    for how in outcome.values():
        counts[how] = counts.get(how, 0) + 1
    print(f"{len(outcome)} files in {args.dir}: " + ", ".join(f"{n} {how}" for how, n in sorted(counts.items())))

    from model.weights.layout import inspect_weights

    report = inspect_weights(args.dir, args.layout)
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    print(f"layout check ({args.layout}): " + ("OK" if report["ok"] else "NOT USABLE"))
    return 0 if report["ok"] else 1
