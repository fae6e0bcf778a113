"""The small commands a diffusers user expects: make a condition map, annotate a photo, generate an image.

Each is a Python function (for notebooks and the README's snippet) and a ``metacontrol`` subcommand
(``condition_map_main`` ...) that only parses flags, calls it and writes PNGs, so a user can try a
ControlNet without reading the world, the condition registry and the pipelines first. diffusers is
imported by ``generate`` alone: it takes seconds, and the other two do not need it.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from metacontrol.conditions import condition_names, get_condition
from metacontrol.config_loader import ConfigError
from metacontrol.data.images import BLACK, BadSampleError, load_rgb
from metacontrol.world import Scene, SceneWorld, WorldConfig

DEFAULT_BASE = "checkpoints/tiny-sd"
DEFAULT_RESOLUTION = WorldConfig().resolution  # the embedded tiny model's size
# What a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, BadSampleError)  # AnnotatorUnavailable is a ConfigError


def condition_map(condition: str, seed: int, resolution: int = DEFAULT_RESOLUTION) -> tuple[Image.Image, Scene]:
    """Scene ``seed`` of the synthetic world and its ``condition`` map (exact, from ground truth).

    The scene comes along for its caption (a prompt the map fits) and its image (what the map shows).
    """
    scene = SceneWorld(WorldConfig(resolution=resolution)).sample(seed)
    return Image.fromarray(get_condition(condition).render(scene)), scene


def annotate_photo(condition: str, photo: str | Path, annotators: str | None = None,
                   resolution: int | None = None) -> Image.Image:
    """``condition``'s map of a real image, by its controlnet-aux annotator (canny, lineart need no weights).

    ``annotators``: folder (a copy of ``lllyasviel/Annotators``) or Hub id holding the detector's
    weights. ``resolution``: centre-crop to a square of this size first, as training data is;
    None keeps the photo's size.
    """
    image = load_rgb(photo, resolution)
    return Image.fromarray(get_condition(condition).annotate(image, annotators))


def generate_image(controlnet: str, control_image: str | Path, prompt: str, base: str = DEFAULT_BASE,
                   steps: int = 20, guidance_scale: float | None = None, seed: int = 0,
                   resolution: int | None = None) -> Image.Image:
    """One image from ``prompt`` under the condition map ``control_image``, through the base family's diffusers
    ControlNet pipeline (``StableDiffusionControlNetPipeline``...; DPM-Solver for the UNet families, as validation
    and evaluation generate).

    The image has the map's size (or ``resolution`` x ``resolution``, the map centre-cropped to it).
    ``guidance_scale`` None is the evaluation's (``metacontrol.pipelines.GUIDANCE_SCALE``).
    """
    import torch

    from metacontrol.controlnet import create_controlnet
    from metacontrol.models.base import load_base_model
    from metacontrol.pipelines import GUIDANCE_SCALE, controlnet_pipeline, generate

    control_map = load_rgb(control_image, resolution, background=BLACK)
    model = load_base_model(base)
    factor = model.vae_scale_factor
    if control_map.shape[0] % factor or control_map.shape[1] % factor:
        raise ConfigError(f"{control_image}: {control_map.shape[1]}x{control_map.shape[0]} px; the base model {base} "
                          f"needs sides divisible by {factor} (pass a resolution, e.g. --resolution 64)")
    net = create_controlnet(model, controlnet)
    pipe = controlnet_pipeline(model, net).to("cuda" if torch.cuda.is_available() else "cpu")
    scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    return Image.fromarray(generate(pipe, [prompt], [control_map], seed, steps, scale)[0])


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` (format from the suffix), creating the folder; a bad suffix is a one-line error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        image.save(path)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: cannot write the image there ({err}); use a .png path") from None
    return path


# -- the metacontrol subcommands ---------------------------------------------------------------------
def _parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    summary, _, details = inspect.cleandoc(doc or "").partition("\n")
    return argparse.ArgumentParser(prog=f"metacontrol {name}", description=summary, epilog=details.strip() or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


@contextmanager
def _one_line_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """A user's mistake (missing file, unknown condition, absent weights) as one line and exit status 1."""
    try:
        yield
    except USER_ERRORS as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def condition_map_main(argv: list[str] | None = None) -> None:
    """Render a condition map of one synthetic scene; prints the scene's caption (a prompt that fits it).

    example: metacontrol condition-map normal --seed 3 -o normal.png --image-out scene.png
    Seeds are the world's: the train split is 0.., val 1000000000.., test 2000000000..
    """
    parser = _parser("condition-map", condition_map_main.__doc__)
    parser.add_argument("condition", help=f"one of {', '.join(condition_names())}")
    parser.add_argument("--seed", type=int, required=True, help="scene seed")
    parser.add_argument("-o", "--output", required=True, help="where to write the map (PNG)")
    parser.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                        help=f"square size in pixels (default {DEFAULT_RESOLUTION}, the tiny model's)")
    parser.add_argument("--image-out", default=None, help="also write the scene's image here")
    args = parser.parse_args(argv)
    with _one_line_errors(parser):
        image, scene = condition_map(args.condition, args.seed, args.resolution)
        save_image(image, args.output)
        if args.image_out:
            save_image(Image.fromarray(np.ascontiguousarray(scene.image)), args.image_out)
    print(scene.caption)


def annotate_main(argv: list[str] | None = None) -> None:
    """Turn a photo into a condition map with the condition's controlnet-aux annotator.

    example: metacontrol annotate canny photo.jpg -o canny.png
    canny and lineart need no weights; hed, scribble, depth, normal and pose read theirs from
    --annotators (a copy of lllyasviel/Annotators, or that Hub id when online). seg has no annotator.
    """
    parser = _parser("annotate", annotate_main.__doc__)
    parser.add_argument("condition", help=f"one of {', '.join(condition_names())}")
    parser.add_argument("photo", help="an image file (any format Pillow reads)")
    parser.add_argument("-o", "--output", required=True, help="where to write the map (PNG)")
    parser.add_argument("--annotators", default=None, help="folder or Hub id of the annotator weights")
    parser.add_argument("--resolution", type=int, default=None,
                        help="centre-crop to a square of this size first (default: keep the photo's size)")
    args = parser.parse_args(argv)
    with _one_line_errors(parser):
        save_image(annotate_photo(args.condition, args.photo, args.annotators, args.resolution), args.output)


def generate_main(argv: list[str] | None = None) -> None:
    """Generate an image from a prompt and a condition map with a ControlNet (StableDiffusionControlNetPipeline).

    example: metacontrol generate --controlnet checkpoints/joint-3x-controlnet-tiny --image normal.png \\
                 --prompt "a red ball in front of a blue wall" -o out.png
    """
    from metacontrol.pipelines import GUIDANCE_SCALE

    parser = _parser("generate", generate_main.__doc__)
    parser.add_argument("--controlnet", required=True, help="a diffusers ControlNet folder of the base's family")
    parser.add_argument("--image", required=True, help="the condition map (PNG), e.g. from condition-map or annotate")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("-o", "--output", required=True, help="where to write the image (PNG)")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"base folder or Hub id: SD 1.x/2.x, SDXL, SD3 or Flux (default {DEFAULT_BASE})")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (DPM-Solver++; default 20)")
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE,
                        help=f"classifier-free guidance (default {GUIDANCE_SCALE})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="centre-crop the map to a square of this size (default: the map's size)")
    args = parser.parse_args(argv)
    with _one_line_errors(parser):
        image = generate_image(args.controlnet, args.image, args.prompt, args.base, args.steps,
                               args.guidance_scale, args.seed, args.resolution)
        save_image(image, args.output)
