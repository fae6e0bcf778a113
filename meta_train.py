"""Meta-train a ControlNet initialisation: ``accelerate launch meta_train.py [--config FILE] [key=value ...]``.

The script's body is ``metacontrol.scripts.meta_train`` (also ``metacontrol meta-train`` once installed); this file
keeps ``accelerate launch meta_train.py`` working from a checkout.
"""

from metacontrol.errors import run_main
from metacontrol.scripts.meta_train import main

if __name__ == "__main__":
    run_main(main, "meta_train")
