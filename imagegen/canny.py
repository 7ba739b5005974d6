"""Canny edges for ControlNet: an RGB image of white edges (255) on black (0).

    grayscale (OpenCV's RGB2GRAY weights, fixed point) -> optional Gaussian blur (`blur`, sigma
    in px; 0 = none) -> 3x3 Sobel (replicated border) -> |dx| + |dy| -> non-maximum suppression
    in 4 directions -> double threshold `low` / `high` -> hysteresis (8-connected)

The steps after the blur are OpenCV's `cv2.Canny(gray, low, high)` with its defaults (aperture
3, L1 gradient): thresholds on the same scale (the 0-255 sliders of A1111's ControlNet, defaults
100 and 200), the same direction sectors (tan 22.5 degrees in 15-bit fixed point) and the same
tie rule (a pixel beats one neighbour strictly and the other with >=), so edges land on the same
pixels. The ControlNet canny models were trained on `cv2.Canny` output without a blur, so the
blur is off by default.

Why our own ~80 lines and not `opencv-python-headless`: the 60 MB native wheel would be a core
dependency for this one function, while numpy and scipy (already core dependencies) do it in
well under a second at 1024 px. `tests/test_controlnet.py` checks the behaviour a Canny must
have and, where the `cv2` module is installed (the `test` extra has it), agreement with
`cv2.Canny` on photos-like test images (the stated tolerance is there).

torch-free; numpy and scipy import inside the function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import PIL.Image

CANNY_LOW = 100  # A1111 ControlNet's default low threshold (0-255 scale)
CANNY_HIGH = 200  # A1111 ControlNet's default high threshold
_SHIFT = 15  # OpenCV's fixed-point shift for the direction test
_TG22 = int(0.4142135623730950488 * (1 << _SHIFT) + 0.5)  # tan(22.5 deg) << 15


def check_thresholds(low: float, high: float, blur: float = 0.0) -> None:
    """Raises InputError unless 0 <= `low` <= `high` and `blur` >= 0."""
    if not 0 <= low <= high:
        raise InputError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    if blur < 0:
        raise InputError(f"canny `blur` must be >= 0 (sigma in px), got {blur}")


def gray(image: "PIL.Image.Image") -> "np.ndarray":
    """8-bit luma of `image` as OpenCV's COLOR_RGB2GRAY computes it; transparent pixels count as
    black (the image is flattened onto black first), so a product cut-out gives its outline."""
    import numpy as np

    from .thumbs import _to_rgb

    rgb = np.asarray(_to_rgb(image, (0, 0, 0)), dtype=np.int32)
    return ((rgb[..., 0] * 4899 + rgb[..., 1] * 9617 + rgb[..., 2] * 1868 + (1 << 13)) >> 14).astype(np.uint8)


def _gaussian(img: "np.ndarray", sigma: float) -> "np.ndarray":
    """Separable Gaussian blur (OpenCV's kernel size rule and reflect-101 border), rounded to 8 bits."""
    import numpy as np

    k = int(round(sigma * 6 + 1)) | 1
    r = k // 2
    x = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-(x * x) / (2 * sigma * sigma))
    w /= w.sum()
    out = img.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect") if out.shape[axis] > r else np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        out = sum(w[i] * np.take(p, range(i, i + n), axis=axis) for i in range(k))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def canny_edges(img: "np.ndarray", low: float, high: float) -> "np.ndarray":
    """Boolean edge map of an HxW uint8 array, as `cv2.Canny(img, low, high)` (see module doc)."""
    import numpy as np
    from scipy import ndimage

    # 1. Sobel 3x3 on a replicated border, and the L1 magnitude.
    p = np.pad(img.astype(np.int32), 1, mode="edge")
    h, w = img.shape
    s = lambda dy, dx: p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731 (shifted view)
    gx = (s(-1, 1) + 2 * s(0, 1) + s(1, 1)) - (s(-1, -1) + 2 * s(0, -1) + s(1, -1))
    gy = (s(1, -1) + 2 * s(1, 0) + s(1, 1)) - (s(-1, -1) + 2 * s(-1, 0) + s(-1, 1))
    mag = np.abs(gx) + np.abs(gy)

    # 2. Non-maximum suppression along the gradient's sector; magnitude is 0 outside the image.
    m = np.pad(mag, 1)
    at = lambda dy, dx: m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]  # noqa: E731
    xs, ys = np.abs(gx).astype(np.int64), np.abs(gy).astype(np.int64) << _SHIFT
    tg22x = xs * _TG22
    tg67x = tg22x + (xs << (_SHIFT + 1))
    horizontal = ys < tg22x
    vertical = ~horizontal & (ys > tg67x)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx ^ gy) >= 0  # the gradient points down-right or up-left: compare (i-1, j-1), (i+1, j+1)
    keep = np.zeros((h, w), dtype=bool)
    keep |= horizontal & (mag > at(0, -1)) & (mag >= at(0, 1))
    keep |= vertical & (mag > at(-1, 0)) & (mag >= at(1, 0))
    keep |= diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1))
    keep |= diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1))

    # 3. Double threshold (OpenCV floors both), then hysteresis: keep each 8-connected group of
    #    candidates that holds a strong pixel.
    lo, hi = int(np.floor(low)), int(np.floor(high))
    candidate = keep & (mag > lo)
    strong = candidate & (mag > hi)
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return candidate
    has_strong = np.zeros(n + 1, dtype=bool)
    has_strong[labels[strong]] = True
    has_strong[0] = False
    return has_strong[labels]


def canny(image: "PIL.Image.Image", low: float = CANNY_LOW, high: float = CANNY_HIGH, *, blur: float = 0.0) -> "PIL.Image.Image":
    """The canny control image of `image`: RGB, white (255) edges on black (0), same size.

    `low` / `high` are OpenCV's thresholds (0-255 scale, A1111 defaults 100 / 200): gradients above
    `high` start an edge, those above `low` continue one. `blur` is a Gaussian sigma in px applied
    first (0: none, as the ControlNet canny models were trained). Deterministic: the same image
    and arguments give the same bytes. Raises InputError for bad thresholds."""
    import numpy as np
    from PIL import Image

    check_thresholds(low, high, blur)
    g = gray(image)
    if blur > 0:
        g = _gaussian(g, blur)
    edges = canny_edges(g, low, high).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2), "RGB")
