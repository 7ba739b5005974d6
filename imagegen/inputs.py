"""Input photos of img2img, inpainting and ControlNet jobs: reading them, the resize rule, masks.

Torch-free (Pillow and numpy only): recipe validation reads headers and hashes here, render
prepares the pixels here, and the engine receives PIL images at the job's size.

The resize rule (A1111's "Crop and resize"): an input is scaled, keeping its aspect ratio,
until it covers the job's size, then the centre is cut out (Lanczos). A photo of the job's size
is used as it is, pixel for pixel; one of another aspect ratio loses a band at two opposite
edges (`crop_note` says how much); nothing is ever stretched. A mask goes through exactly the
same geometry as its photo, so mask and photo stay aligned.

Masks: white = repaint, black = keep (A1111's convention), any mode (converted to 8-bit grey).
`mask: alpha` uses the photo's own transparency: opaque pixels (the product) are kept,
transparent ones repainted (mask = 255 - alpha), and the paste-back blends the photo's own
colours by its alpha (a cut-out composited onto the render: no fringe at anti-aliased edges;
the recipe's blur default is 0 there, the alpha edge being soft already). A photo with an
alpha channel is flattened onto white before diffusion sees it (as A1111 does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagegen.errors import InputError
from imagegen.fsutil import not_a_regular_file

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what a folder of photos lists
MAX_INPUT_PIXELS = 100_000_000  # an input photo may have at most this many pixels (100 MP)
ALPHA = "alpha"  # `mask: alpha`: the photo's own transparency is the mask
FLATTEN_ON = (255, 255, 255)  # the background a photo with transparency is flattened onto (A1111: white)
ASPECT_SLACK = 1  # px: a mask whose size scaled to its photo's is off by at most this is the same aspect


@dataclass(frozen=True)
class InputFile:
    """An input image as the recipe found it: absolute path, sha256 of its bytes, pixel size,
    and whether it has an alpha channel."""

    path: str
    sha256: str
    width: int
    height: int
    has_alpha: bool = False

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def short(self) -> str:
        """The first 12 hex digits of its sha256 (names its thumbnail)."""
        return self.sha256[:12]


def probe(path: str | Path) -> InputFile:
    """Read an input image's header (size, alpha) and hash its bytes; no pixels are decoded.

    Raises InputError naming the file when it is missing, not a regular file, not an image
    Pillow can read, or larger than MAX_INPUT_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    from imagegen.metadata import file_sha256

    p = Path(path)
    special = not_a_regular_file(p)
    if special:
        raise InputError(f"`{p}` {special}")
    if not p.is_file():
        raise InputError(f"image file not found: `{p}`")
    try:
        with Image.open(p) as im:
            width, height = im.size
            alpha = has_alpha(im)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        why = "not an image Pillow can read" if isinstance(exc, UnidentifiedImageError) else " ".join(str(exc).split())[:200]
        raise InputError(f"`{p}`: {why}") from None
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"`{p}` is {width}x{height} ({width * height / 1e6:.0f} MP); input images may have at most "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} MP")
    try:
        digest = file_sha256(p)
    except OSError as exc:
        raise InputError(f"`{p}`: cannot read: {exc.strerror or exc}") from None
    return InputFile(str(p.resolve()), digest, width, height, alpha)


def list_folder(folder: str | Path) -> list[Path]:
    """The image files directly in `folder` (by IMAGE_SUFFIXES), sorted by name."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                  key=lambda p: p.name)


def crop_box(src_w: int, src_h: int, width: int, height: int) -> tuple[float, float, float, float]:
    """The region of a `src_w`x`src_h` image that the resize rule scales to `width`x`height`:
    the largest centred box of the target's aspect ratio."""
    scale = max(width / src_w, height / src_h)
    bw, bh = width / scale, height / scale
    left, top = (src_w - bw) / 2, (src_h - bh) / 2
    return left, top, left + bw, top + bh


def crop_note(src: InputFile, width: int, height: int) -> str | None:
    """What the resize rule cuts from `src` for a `width`x`height` job, or None when nothing is cut."""
    left, top, right, bottom = crop_box(src.width, src.height, width, height)
    cut_x, cut_y = round(src.width - (right - left)), round(src.height - (bottom - top))
    if cut_x <= 0 and cut_y <= 0:
        return None
    where = f"{cut_x} px of its width (left and right)" if cut_x > 0 else f"{cut_y} px of its height (top and bottom)"
    return f"`{src.name}` is {src.width}x{src.height}: for {width}x{height} it is cropped by {where}, centred"


def fit(image: "Image.Image", width: int, height: int) -> "Image.Image":
    """`image` by the resize rule: scaled to cover `width`x`height` and centre-cropped (Lanczos).
    An image already of that size comes back unchanged (a copy)."""
    from PIL import Image

    if image.size == (width, height):
        return image.copy()
    box = crop_box(image.width, image.height, width, height)
    return image.resize((width, height), Image.LANCZOS, box=box)


def open_image(path: str | Path, sha256: str | None) -> "Image.Image":
    """The decoded image at `path`; with `sha256`, the file must still be what the recipe hashed."""
    from PIL import Image

    from imagegen.metadata import file_sha256

    try:
        if sha256 is not None and file_sha256(path) != sha256:
            raise InputError(f"`{path}` changed since the recipe was read (its sha256 is not {sha256[:12]}...); "
                             "run the command again to plan with the new file")
        with Image.open(path) as im:
            im.load()
            return im
    except OSError as exc:
        raise InputError(f"`{path}`: cannot read: {exc.strerror or ' '.join(str(exc).split())[:200]}") from None


def flatten(image: "Image.Image") -> "Image.Image":
    """An RGB image; transparency (if any) flattened onto FLATTEN_ON (the thumbnails' helper)."""
    from imagegen.thumbs import _to_rgb

    return _to_rgb(image, FLATTEN_ON)


def load_photo(path: str | Path, width: int, height: int, sha256: str | None = None, *,
               straight: bool = False) -> "Image.Image":
    """The photo at `path` as RGB at `width`x`height` by the resize rule, transparency flattened
    onto FLATTEN_ON; with `straight`, the colours of a photo with alpha as they are (what the
    paste-back of `mask: alpha` blends by the alpha). Raises InputError."""
    image = open_image(path, sha256)
    if straight and has_alpha(image):
        return fit(image.convert("RGBA"), width, height).convert("RGB")
    return fit(flatten(image), width, height)


def has_alpha(image: "Image.Image") -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_mask(mask: str, photo: str | Path, width: int, height: int, blur: float, *, mask_sha256: str | None = None,
              photo_sha256: str | None = None) -> "Image.Image":
    """The 8-bit mask (white = repaint) for `photo` at `width`x`height`, Gaussian-blurred by
    `blur` px: from a mask file (same size as the photo, or the same aspect ratio: then scaled
    to the photo's size first), or ALPHA for the photo's transparency. Raises InputError."""
    from PIL import Image, ImageFilter, ImageOps

    source = open_image(photo, photo_sha256)
    if mask == ALPHA:
        if not has_alpha(source):
            raise InputError(f"`mask: alpha`: `{photo}` has no alpha channel")
        m = ImageOps.invert(source.convert("RGBA").getchannel("A"))
    else:
        m = open_image(mask, mask_sha256).convert("L")
        if m.size != source.size:
            problem = mask_size_problem(m.size, source.size)
            if problem:
                raise InputError(f"mask `{mask}`: {problem}")
            m = m.resize(source.size, Image.BILINEAR)
    m = fit(m, width, height)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return m


def mask_size_problem(mask_size: tuple[int, int], photo_size: tuple[int, int]) -> str | None:
    """Why a mask of `mask_size` cannot go with a photo of `photo_size` (another aspect ratio),
    or None when it can (the same size, or the same aspect ratio within ASPECT_SLACK px)."""
    (mw, mh), (pw, ph) = mask_size, photo_size
    if (mw, mh) == (pw, ph):
        return None
    if abs(mh * pw / mw - ph) <= ASPECT_SLACK and abs(mw * ph / mh - pw) <= ASPECT_SLACK:
        return None
    return (f"is {mw}x{mh} but its photo is {pw}x{ph} (another aspect ratio); give a mask of the photo's size "
            "(white = repaint, black = keep)")


def paste_unmasked(rendered: "Image.Image", photo: "Image.Image", mask: "Image.Image") -> "Image.Image":
    """`rendered` where the mask is white, `photo` where it is black, blended in between (8-bit):
    every pixel whose mask value is 0 equals the photo's exactly."""
    from PIL import Image

    return Image.composite(rendered.convert("RGB"), photo.convert("RGB"), mask.convert("L"))


INPUT_THUMBS = "inputs"  # the run folder's thumbs/inputs/: one thumbnail per input photo


def thumbnail_path(thumbs: Path, sha256: str) -> Path:
    """Where the thumbnail of the input photo with `sha256` lives under a run's `thumbs` folder."""
    return Path(thumbs) / INPUT_THUMBS / f"{sha256[:12]}.jpg"
