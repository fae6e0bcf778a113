"""Prepare photos for training: ``accelerate launch train/prepare.py [--config FILE] [key=value ...]``.

The script's body is ``metacontrol.scripts.prepare`` (also ``metacontrol prepare`` once installed); this file
keeps ``accelerate launch train/prepare.py`` working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when metacontrol is not installed

from metacontrol.cli import run_script

if __name__ == "__main__":
    run_script("prepare", sys.argv[1:])
