#!/usr/bin/env python3
"""Write seeded tiny random MultiTalk checkpoints in a published layout.

Usage: python scripts/make_tiny_weights.py OUT --layout multitalk|diffusers [--seed N]
Same file names and key names as the real checkpoints (and bf16/fp16 where those are), tiny sizes;
the same seed gives the same numbers in both layouts.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.weights.tiny import write_tiny_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", choices=["multitalk", "diffusers"], default="multitalk")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_tiny_weights(args.out, args.layout, args.seed)
    print(f"tiny {args.layout} weights (seed {args.seed}) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
