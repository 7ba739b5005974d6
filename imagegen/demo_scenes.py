"""The world of `builtin:demo-sd15`: the scenes it was trained on, their captions, and a reader
that measures what a picture shows (numpy and PIL only: no torch).

A scene is one flat-coloured shape on a flat background, drawn at 4x and reduced (anti-aliased):

- shape: circle, square, triangle, star, ring;
- colour (shape and background, never the same): the twelve names of `PALETTE`;
- size: small (radius 14% of the side) or large (22%), with +-10% jitter;
- position: a 3x3 grid (`POSITIONS`), cell centres at 25%, 50%, 75% of the side, +-2% jitter.

Captions read "a small red circle at the top left on a blue background"; in training each of
size, position and background is left out with probability 0.15 (the scene still picks a value
for it at random) and the whole caption is empty 10% of the time (for classifier-free guidance).
`HELD_OUT` (colour, shape) pairs are never drawn in training; the benchmark prompts them.

`read_scene` measures a rendered picture: background colour from the border, shape pixels as
those far from it, their colour, their centroid's grid cell, and the shape class by the nearest
mean silhouette (`shape_templates`, made from the generator's own drawings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (30, 60, 210),
    "purple": (130, 50, 180),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "brown": (120, 70, 30),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = {"small": 0.14, "large": 0.22}  # radius as a fraction of the side
# phrase -> (column, row) in the 3x3 grid
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (0, 0),
    "at the top": (1, 0),
    "at the top right": (2, 0),
    "on the left": (0, 1),
    "in the centre": (1, 1),
    "on the right": (2, 1),
    "at the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "at the bottom right": (2, 2),
}
CELL_CENTRES = (0.25, 0.5, 0.75)
OUTLINE = (250, 250, 250)  # what the demo LoRA adds: a white outline around the shape
# (colour, shape) pairs never drawn in training: one per colour, each shape at least twice.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("orange", "ring"), ("yellow", "triangle"), ("green", "square"),
    ("cyan", "circle"), ("blue", "triangle"), ("purple", "ring"), ("pink", "star"),
    ("white", "square"), ("black", "circle"), ("grey", "star"), ("brown", "ring"),
)  # fmt: skip
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    position: str
    # jitter, as fractions of the side
    dx: float = 0.0
    dy: float = 0.0
    dr: float = 1.0
    angle: float = 0.0  # degrees; stars and triangles only, small

    def caption(self, *, size: bool = True, position: bool = True, background: bool = True) -> str:
        """'a small red circle at the top left on a blue background' (parts may be left out)."""
        words = ["a"] + ([self.size] if size else []) + [self.colour, self.shape]
        if position:
            words.append(self.position)
        if background:
            words += ["on a", self.background, "background"]
        return " ".join(words)


def random_scene(rng: np.random.Generator, *, training: bool = True) -> Scene:
    """A random scene; with `training`, never one of the `HELD_OUT` (colour, shape) pairs."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        if not (training and (colour, shape) in HELD_OUT):
            break
    bg = colour
    while bg == colour:
        bg = COLOURS[rng.integers(len(COLOURS))]
    size = ("small", "large")[rng.integers(2)]
    pos = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    return Scene(shape, colour, bg, size, pos, dx=float(rng.uniform(-0.02, 0.02)), dy=float(rng.uniform(-0.02, 0.02)),
                 dr=float(rng.uniform(0.9, 1.1)), angle=float(rng.uniform(-8, 8)))  # fmt: skip


def random_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The training caption: parts dropped with probability 0.15, empty 10% of the time."""
    if rng.random() < 0.1:
        return ""
    return scene.caption(size=rng.random() >= 0.15, position=rng.random() >= 0.15, background=rng.random() >= 0.15)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    a0 = math.radians(angle) - math.pi / 2
    if shape == "triangle":
        pts = [(cx + r * math.cos(a0 + k * 2 * math.pi / 3), cy + r * 1.05 * math.sin(a0 + k * 2 * math.pi / 3) + 0.2 * r) for k in range(3)]
        return pts
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(a0 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(a0 + k * math.pi / 5)) for k in range(10)]  # fmt: skip
    raise ValueError(shape)


def _mask(scene: Scene, big: int) -> Image.Image:
    m = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(m)
    col, row = POSITIONS[scene.position]
    cx = (CELL_CENTRES[col] + scene.dx) * big
    cy = (CELL_CENTRES[row] + scene.dy) * big
    r = SIZES[scene.size] * scene.dr * big
    if scene.shape in ("circle", "ring"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if scene.shape == "ring":
            q = 0.55 * r
            d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)
    elif scene.shape == "square":
        h = r * 0.82
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    else:
        d.polygon(_polygon(scene.shape, cx, cy, r, scene.angle), fill=255)
    return m


def draw(scene: Scene, side: int = 32, *, outline: bool = False) -> Image.Image:
    """The scene as an RGB image `side` pixels square (drawn at 4x, reduced with a box filter).

    `outline`: add a white outline (side/16 pixels wide: 2 at 32 px, outside the shape and around
    a ring's hole) around the shape: the demo LoRA's training target. (At side/32, one pixel, a
    VAE decode turns it into a pale halo that no longer reads as white.)
    """
    big = side * SUPERSAMPLE
    img = Image.new("RGB", (big, big), PALETTE[scene.background])
    m = _mask(scene, big)
    if outline:
        w = max(1, big // 16)
        grown = m.filter(ImageFilter.GaussianBlur(w / 2)).point(lambda v: 255 if v > 8 else 0)
        img.paste(OUTLINE, (0, 0), grown)
    img.paste(PALETTE[scene.colour], (0, 0), m)
    return img.resize((side, side), Image.BOX)


# --- reading a picture ----------------------------------------------------------------------


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest to an RGB triple."""
    names = list(PALETTE)
    pal = np.array([PALETTE[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((pal - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)))]


def _silhouette(mask: np.ndarray, n: int = 16) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((n, n), Image.BILINEAR), dtype=np.float32) / 255


_TEMPLATES: dict[str, np.ndarray] = {}


def shape_templates(side: int = 32) -> dict[str, np.ndarray]:
    """Mean 16x16 silhouette of each shape over 60 generator drawings (fixed seed)."""
    if side in _TEMPLATES:
        return _TEMPLATES[side]  # type: ignore[return-value]
    rng = np.random.default_rng(1234)
    out = {}
    for s in SHAPES:
        acc = []
        for _ in range(60):
            sc = random_scene(rng, training=False)
            sc = Scene(s, "red", "blue", sc.size, sc.position, sc.dx, sc.dy, sc.dr, sc.angle)
            m = _shape_mask(np.asarray(draw(sc, side), dtype=np.float32), np.array(PALETTE["blue"], np.float32))
            sil = _silhouette(m)
            if sil is not None:
                acc.append(sil)
        out[s] = np.mean(acc, axis=0)
    _TEMPLATES[side] = out  # type: ignore[assignment]
    return out


def _shape_mask(a: np.ndarray, bg: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - bg) ** 2).sum(-1)) > 60


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    position: str | None
    outline: float  # fraction of the shape's rim pixels that are near white


def read_scene(image: Image.Image | np.ndarray) -> Reading:
    """Measure a picture: background (border median), shape pixels (far from it), their
    colour (median of the core, away from the rim), grid cell of their centroid, shape class
    (nearest mean silhouette) and how much of the shape's rim is white (the LoRA's mark)."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    side = a.shape[0]
    b = max(2, side // 32)
    border = np.concatenate([a[:b].reshape(-1, 3), a[-b:].reshape(-1, 3), a[:, :b].reshape(-1, 3), a[:, -b:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = nearest_colour(bg_rgb)
    mask = _shape_mask(a, bg_rgb)
    if mask.sum() < max(4, side * side // 400):
        return Reading(bg, None, None, None, 0.0)
    # largest blob only would be better; the centroid of all far pixels is enough here
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / side, ys.mean() / side
    pos_cell = (min(2, int(cx * 3)), min(2, int(cy * 3)))
    position = next(p for p, c in POSITIONS.items() if c == pos_cell)
    # the core: mask pixels whose 4 neighbours at distance k are in the mask too
    k = max(1, side // 32)
    core = mask.copy()
    core[k:] &= mask[:-k]
    core[:-k] &= mask[k:]
    core[:, k:] &= mask[:, :-k]
    core[:, :-k] &= mask[:, k:]
    pix = a[core] if core.sum() >= 4 else a[mask]
    white = np.sqrt(((a - np.array(OUTLINE, np.float32)) ** 2).sum(-1)) < 90
    nonwhite = pix[~(np.sqrt(((pix - np.array(OUTLINE, np.float32)) ** 2).sum(-1)) < 90)]
    colour = nearest_colour(np.median(nonwhite if len(nonwhite) >= 4 else pix, axis=0))
    rim = mask & ~core
    outline = float(white[rim].mean()) if rim.any() else 0.0
    sil = _silhouette(mask)
    temps = shape_templates(side)
    shape = min(temps, key=lambda s: float(((temps[s] - sil) ** 2).mean())) if sil is not None else None
    return Reading(bg, colour, shape, position, outline)
