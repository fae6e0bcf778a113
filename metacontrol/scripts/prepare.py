"""Prepare a set of photos for training: resized images, condition maps and optionally encodings, as shards.

    metacontrol prepare train_data_dir=photos conditions='[canny, hed]' annotators=/models/Annotators
    accelerate launch train/prepare.py --config configs/prepare_sd15.yaml        # split across processes
    metacontrol prepare source=hf train_data_dir=saved_dataset encode=true pretrained_model_name_or_path=...

Reads an image folder with metadata.jsonl (``source: imagefolder``), a dataset saved with ``save_to_disk``
(``hf``) or a streamed 🤗 dataset (``stream``), and writes ``output_dir`` (see ``metacontrol/data/prepare.py``
for the layout). Train on it with ``data.source=prepared data.train_data_dir=<output_dir>``, or give
``<output_dir>/<condition>`` to diffusers' ``train_controlnet.py --train_data_dir``. Run the same command again
after an interruption: finished shards are kept, the rest are prepared.
"""

from __future__ import annotations

import argparse
import logging

from metacontrol.config import PrepareConfig
from metacontrol.config_loader import config_argument_parser, load_config
from metacontrol.data.prepare import prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return config_argument_parser(__doc__, None, "train_data_dir=photos conditions='[canny]'").parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return prepare(load_config(PrepareConfig, args.config, args.overrides))
