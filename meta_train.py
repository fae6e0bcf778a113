"""Meta-train a ControlNet initialisation: ``accelerate launch meta_train.py [--config FILE] [key=value ...]``.

The script's body is ``metacontrol.scripts.meta_train`` (also ``metacontrol meta-train`` once installed); this file
keeps ``accelerate launch meta_train.py`` working from a checkout.
"""

import sys

from metacontrol.cli import run_script

if __name__ == "__main__":
    run_script("meta_train", sys.argv[1:])
