"""Re-render an image from the metadata inside it and compare the pixels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from imagegen.errors import InputError
from imagegen.metadata import read_provenance

if TYPE_CHECKING:  # pragma: no cover
    from imagegen.engine.stability import Stability


@dataclass
class Reproduction:
    index: int | None
    seed: int
    max_diff: int
    mean_diff: float
    device: str
    dtype: str
    stability: "Stability | None" = None  # the probe's figures, when the pixels differed

    def explanation(self) -> str | None:
        """What a difference means, from the stability probe (None when there was no probe)."""
        st = self.stability
        if st is None:
            return None
        if st.stable:
            return (f"the model is numerically stable for this job ({st.summary()}), so the difference is not "
                    "rounding: the image was rendered with other library versions, another device or dtype, "
                    "or an engine bug")
        return (f"the model is numerically unstable for this job ({st.summary()}): tiny rounding differences "
                "(batch size, device, library versions) grow into visibly different pixels, so this job cannot be "
                "reproduced exactly; well-conditioned models and LoRAs do not do this")


def reproduce_image(path: str | Path, *, device: str | None = None, dtype: str | None = None,
                    out: str | Path | None = None, open_engine=None, tolerance: int = 1,
                    probe: bool = True) -> Reproduction:
    """Render the job recorded in `path`'s `imagegen` metadata again and compare.

    When the pixels differ by more than `tolerance` levels and `probe` is true, the stability
    probe (imagegen.engine.stability) runs on the job and its figures come back in
    `Reproduction.stability`: they say whether the model is numerically unstable for it.

    Raises InputError when the file has no imagegen metadata, ModelError when the model or a
    LoRA it names is gone."""
    import numpy as np
    from PIL import Image

    from imagegen.engine import GenRequest, HiresRequest
    from imagegen.engine import open_engine as default_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if out is not None:
        out = Path(out)
        if out.suffix.lower() != ".png":
            raise InputError(f"`--out` {out}: give a .png file name")
        if not out.parent.is_dir():
            raise InputError(f"`--out` {out}: folder {out.parent} does not exist")
    prov = read_provenance(path) or _upscale_provenance(path)
    if not prov or "content" not in prov:
        raise InputError(f"{path}: no imagegen metadata (only images rendered by imagegen can be reproduced)")
    if prov.get("upscale"):
        source = prov["upscale"].get("source", {}).get("file")
        where = _source_render(path, source)
        raise InputError(f"{path}: an upscaled image; reproduce its source render instead "
                         f"({source or 'the image in images/'}): imagegen reproduce {where}")
    if prov.get("first_pass"):
        raise InputError(f"{path}: the first pass of a hires image; reproduce the final image in images/ instead")
    c = prov["content"]
    hires = HiresRequest.from_content(c["hires"]) if c.get("hires") else None
    upscaler = hires.upscaler if hires and Path(hires.upscaler).is_absolute() else None
    files = [(prov.get("input") or {}).get(k) for k in ("photo", "mask")] + [u.get(k) for u in prov.get("controlnet") or []
                                                                           for k in ("model", "image")]
    for ref in [c["model"], c.get("vae"), *(p for p, _ in c["loras"]), *c.get("embeddings", []), upscaler,
                *(f for f in files if f and f != "alpha")]:
        if ref and not ref.startswith("builtin:") and not Path(ref).exists():
            raise InputError(f"{path}: the image was rendered with `{ref}`, which is no longer there")
    # The original's pixels first: a damaged file is one line now, not a traceback after a render.
    try:
        with Image.open(path) as im:
            old = np.asarray(im.convert("RGB"), dtype=np.int16)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: the image is damaged ({' '.join(str(exc).split()) or type(exc).__name__}); "
                         "its metadata is readable, but there are no pixels to compare; render the job again "
                         "(delete the file and run `imagegen render` on its recipe)") from None
    engine = (open_engine or default_open)(c["model"], family=prov.get("family") or "auto", vae=c.get("vae"),
                                           device=device, dtype=dtype)
    engine.set_loras([(p, w) for p, w in c["loras"]])
    if c.get("embeddings"):
        engine.set_embeddings(c["embeddings"])
    w, h = c["size"]
    from imagegen.render.photos import PhotoCache, photo_job

    job = photo_job(c, prov, hires)  # its photo, mask and control images, checked against their sha256
    photos = PhotoCache()
    request = GenRequest(c["prompt"], c["negative"], c["seed"], w, h, c["steps"], c["guidance"], c["scheduler"],
                         c["clip_skip"], c.get("prompt_syntax", "a1111"), c.get("emphasis", "original"),
                         hires=hires, init=photos.init_request(job), controlnet=photos.control_requests(job))
    [result] = engine.generate([request])
    if result.image is None:
        raise InputError(f"{path}: the new render failed: {result.error}")
    new = np.asarray(result.image.convert("RGB"), dtype=np.int16)
    if old.shape != new.shape:
        diff_max, diff_mean = 255, 255.0
    else:
        d = np.abs(old - new)
        diff_max, diff_mean = int(d.max()), float(d.mean())
    if out is not None:
        from imagegen.fsutil import write_atomic
        from imagegen.metadata import png_text_chunks, read_png_text

        params = read_png_text(path).get("parameters", "")
        write_atomic(out, lambda f: result.image.save(f, format="PNG", pnginfo=png_text_chunks(params, prov)))
    stability = None
    if probe and diff_max > tolerance:
        from imagegen.engine.stability import probe_stability

        stability = probe_stability(engine, request, threshold=tolerance)
    return Reproduction(prov.get("index"), c["seed"], diff_max, diff_mean, engine.device, engine.dtype, stability)


def _upscale_provenance(path: Path) -> dict | None:
    """The imagegen JSON of an upscaled TIFF or JPEG (PNG text chunks are read above), or None."""
    try:
        from imagegen.upscale.meta import read_metadata

        return read_metadata(path).get("imagegen")
    except (OSError, ValueError, SyntaxError):
        return None


def _source_render(upscaled: Path, source: str | None) -> str:
    """Where the source render of `upscaled` is: RUN/images/<source> when the upscale sits in a
    run's upscaled/ folder and the file is there, else the source's file name as recorded."""
    if not source:
        return "(the source image in the run's images/ folder)"
    candidate = upscaled.parent.parent / "images" / source
    return str(candidate) if candidate.is_file() else source
