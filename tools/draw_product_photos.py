"""Draw the product photos of recipes/product.yaml: a large yellow star (the demo model's world,
imagegen.demo_scenes) on transparency, shot twice (centred, and on the left), 32x32 PNG.

    python tools/draw_product_photos.py            # writes recipes/photos/star.png, star-left.png

The alpha channel is the shape's anti-aliased coverage, so `mask: alpha` keeps exactly the
star. Deterministic: the same files every run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from imagegen.demo_scenes import PALETTE, SUPERSAMPLE, Scene, _mask

OUT = Path(__file__).resolve().parent.parent / "recipes" / "photos"
SIDE = 32  # builtin:demo-sd15's size: the photos are used pixel for pixel
SHOTS = {"star.png": "in the centre", "star-left.png": "on the left"}


def product(position: str, side: int = SIDE) -> Image.Image:
    """The yellow star at `position` as RGBA: colour where the shape is, alpha = its coverage."""
    scene = Scene("star", "yellow", "blue", "large", position)
    alpha = _mask(scene, side * SUPERSAMPLE).resize((side, side), Image.BOX)
    image = Image.new("RGBA", (side, side), PALETTE["yellow"] + (0,))
    image.putalpha(alpha)
    return image


def main(out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, position in SHOTS.items():
        product(position).save(out / name, optimize=True)
        print(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
