"""Pre-train the tiny base model: ``python train/pretrain_base.py [--config FILE] [key=value ...]``.

The script's body is ``metacontrol.scripts.pretrain_base`` (also ``metacontrol pretrain-base`` once installed); this file
keeps ``python train/pretrain_base.py`` working from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when metacontrol is not installed

from metacontrol.cli import run_script

if __name__ == "__main__":
    run_script("pretrain_base", sys.argv[1:])
