"""The `multitalk` command line.

Nothing here imports torch at module import time: each subcommand imports what it needs, so
`multitalk --help` is instant and the server package stays importable without the model stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.cli.doctor import add_doctor_parser
from server.cli.generate import add_generate_parser
from server.cli.serve import add_server_parsers
from server.cli.weights import add_download_parser
from server.logging_setup import setup_logging


def _weights_check(args: argparse.Namespace) -> int:
    from model.weights.layout import inspect_weights

    report = inspect_weights(args.dir, args.layout)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if report["ok"] else 1
    print(f"weights: {report['root']}")
    print(f"layout:  {report['layout'] or 'not recognised'}")
    for part, where in report.get("files", {}).items():
        shown = where if isinstance(where, str) else f"{len(where)} file(s): " + ", ".join(Path(w).name for w in where)
        print(f"  {part:14s} {shown}")
    if "transformer" in report:
        params = report["transformer"]["parameters"]
        config = report["transformer"]["config"]
        print(f"transformer: {config['num_layers']} blocks, width "
              f"{config['num_attention_heads'] * config['attention_head_dim']}, stored as {', '.join(report['transformer']['dtypes'])}")
        print(f"  parameters: base {params['base']:,} + audio adapter {params['audio_adapter']:,} = {params['total']:,}")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    print("OK" if report["ok"] else "NOT USABLE")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitalk", description="Self-hosted MultiTalk inference server")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    weights = commands.add_parser("weights", help="download and inspect checkpoints").add_subparsers(dest="weights_command", required=True)
    check = weights.add_parser("check", help="report the layout, parameter counts and anything missing in DIR")
    check.add_argument("dir", type=Path, help="folder holding Wan2.1-I2V-14B-480P[-Diffusers], MeiGen-MultiTalk, chinese-wav2vec2-base")
    check.add_argument("--layout", choices=["multitalk", "diffusers"], help="force a layout (default: detect)")
    check.add_argument("--json", action="store_true", help="machine-readable report")
    check.set_defaults(handler=_weights_check)
    add_download_parser(weights)
    add_generate_parser(commands)
    add_server_parsers(commands)
    add_doctor_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
