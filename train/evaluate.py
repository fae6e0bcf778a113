"""Evaluate ControlNets on held-out conditions: ``python train/evaluate.py [--config FILE] [key=value ...]``.

The script's body is ``metacontrol.scripts.evaluate`` (also ``metacontrol evaluate`` once installed); this file
keeps ``python train/evaluate.py`` working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when metacontrol is not installed

from metacontrol.cli import run_script

if __name__ == "__main__":
    run_script("evaluate", sys.argv[1:])
