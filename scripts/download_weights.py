#!/usr/bin/env python3
"""Download the MultiTalk checkpoints into a weights folder: exactly `multitalk weights download`.

Usage: python scripts/download_weights.py [--layout multitalk|diffusers] [--dir weights/]
                                          [--with-lora fusionx|lightx2v ...] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["weights", "download", *sys.argv[1:]]))
