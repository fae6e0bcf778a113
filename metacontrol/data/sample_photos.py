"""scikit-image's photos (it ships a few; controlnet-aux depends on it) as an image folder, and random HED weights:
a real-file stand-in for the user's photos and annotators, for tests, ``bench/sd15_smoke.py`` and a first try."""

from __future__ import annotations

import json
from pathlib import Path

# Real photos that scikit-image ships (controlnet-aux depends on it), with captions a user might write.
PHOTOS = {"astronaut.png": "an astronaut in front of a flag", "chelsea.png": "a cat looking to the side",
          "coffee.png": "a cup of coffee on a saucer", "rocket.jpg": "a rocket on its launch pad",
          "motorcycle_left.png": "a motorcycle in a workshop", "retina.jpg": "a photo of a retina",
          "hubble_deep_field.jpg": "galaxies in deep space", "ihc.png": "stained tissue under a microscope"}


def write_photo_folder(root: Path, size: int = 64, names: list[str] | None = None) -> Path:
    """An image folder of scikit-image's photos (shorter side ``size``) with metadata.jsonl captions."""
    import skimage.data
    from PIL import Image

    source = Path(skimage.data.__file__).parent
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in names or list(PHOTOS):
        image = Image.open(source / name).convert("RGB")
        scale = size / min(image.size)
        image.resize((round(image.width * scale), round(image.height * scale))).save(root / f"{Path(name).stem}.png")
        lines.append(json.dumps({"file_name": f"{Path(name).stem}.png", "text": PHOTOS[name]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def random_hed_annotators(folder: Path) -> Path:
    """A controlnet-aux annotator folder holding HED with random weights (the real network, untrained)."""
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder


