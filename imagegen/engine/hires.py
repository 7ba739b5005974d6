"""The hires pass (A1111's "Hires. fix"): enlarge the first pass, then img2img at the new size.

    first pass (txt2img at the model's size)
      -> latent upscaler: interpolate the latents (no decode)
         pixel upscaler: the decoded 8-bit image, Lanczos or Real-ESRGAN (tiled), then Lanczos
      -> img2img on the same components (`from_pipe`: no second copy of the model), `steps`
         steps at strength `denoise`, on a schedule `int(steps / denoise)` steps long (A1111)

Noise: each image's CPU generator continues from where its first pass left it, so the second
pass is batch-size invariant and a plain diffusers script reproduces it by passing the same
generator object to the txt2img call and then to the img2img call.

torch and diffusers are imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..defaults import HIRES_UPSCALERS, MAX_RENDER_SIDE
from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

MAX_MODEL_PASSES = 3  # Real-ESRGAN passes at most, before the final Lanczos resize (as A1111)


@dataclass(frozen=True)
class HiresRequest:
    """The second pass of a `GenRequest`: img2img at `width`x`height` after `upscaler`.

    `upscaler` is a `defaults.HIRES_UPSCALERS` name (latent, latent-bicubic, latent-nearest,
    lanczos) or the path of a Real-ESRGAN weight file. `keep_first` returns the first pass's
    image too (`GenResult.first`)."""

    width: int
    height: int
    upscaler: str
    denoise: float
    steps: int
    scheduler: str
    keep_first: bool = False

    @classmethod
    def from_content(cls, content: dict, *, keep_first: bool = False) -> "HiresRequest":
        """From a job's canonical `hires` content (plan.HiresPass.content, the image's JSON)."""
        w, h = content["size"]
        return cls(int(w), int(h), content["upscaler"], float(content["denoise"]), int(content["steps"]), content["scheduler"],
                   keep_first)

    @property
    def latent_mode(self) -> str | None:
        """torch interpolation mode of a latent upscaler; None for a pixel upscaler."""
        entry = HIRES_UPSCALERS.get(self.upscaler)
        return entry[1] if entry else None

    def schedule(self) -> tuple[int, float]:
        """(num_inference_steps, strength) for diffusers' img2img: see `img2img_schedule`."""
        return img2img_schedule(self.steps, self.denoise)


def img2img_schedule(steps: int, denoise: float) -> tuple[int, float]:
    """diffusers img2img arguments that run A1111's hires pass: the last `steps` steps of a
    schedule `int(steps / denoise)` steps long.

    diffusers runs `min(int(n * strength), n)` steps of an `n`-step schedule, so `strength =
    denoise` would sometimes run one step fewer (15 steps at 0.35: int(42 * 0.35) = 14). The
    strength returned, `(steps + 0.5) / n` (at most 1), makes that product exactly `steps`.
    The noise level is set by the schedule position, so the strength has no other effect."""
    n = max(steps, int(steps / denoise))
    strength = min(1.0, (steps + 0.5) / n)
    assert min(int(n * strength), n) == steps
    return n, strength


def check_hires(hr: HiresRequest) -> None:
    """Raises InputError for a second pass that cannot run."""
    if hr.width % 8 or hr.height % 8 or not 8 <= hr.width <= MAX_RENDER_SIDE or not 8 <= hr.height <= MAX_RENDER_SIDE:
        raise InputError(f"hires `width` and `height` must be multiples of 8 up to {MAX_RENDER_SIDE}, got {hr.width}x{hr.height}")
    if not 0 < hr.denoise <= 1:
        raise InputError(f"hires `denoise` must be above 0 and at most 1, got {hr.denoise}")
    if hr.steps < 1:
        raise InputError(f"hires `steps` must be >= 1, got {hr.steps}")
    if hr.upscaler not in HIRES_UPSCALERS:
        from pathlib import Path

        if not Path(hr.upscaler).is_file():
            raise InputError(f"hires `upscaler` must be one of {', '.join(HIRES_UPSCALERS)} or a weight file; "
                             f"{hr.upscaler!r} is neither")


def first_output_type(hr: HiresRequest) -> str:
    """What the first pass returns: latents for a latent upscaler, else the decoded image."""
    return "latent" if hr.latent_mode else "np"


def to_uint8(arr: Any) -> Any:
    """An HxWx3 float image in [0, 1] as 8-bit RGB, rounded as diffusers rounds its PIL output."""
    import numpy as np

    return (np.clip(arr, 0, 1) * 255).round().astype("uint8")


def decode_latents(pipe: Any, latents: Any) -> Any:
    """The pipeline's own decode of first-pass latents to a (B, H, W, 3) float array in [0, 1]
    (for `keep_first` with a latent upscaler)."""
    import torch

    vae = pipe.vae
    with torch.no_grad():
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        lat = latents.to(device=vae.device, dtype=next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(lat)
            std = torch.tensor(std).view(1, -1, 1, 1).to(lat)
            lat = lat * std / vae.config.scaling_factor + mean
        else:
            lat = lat / vae.config.scaling_factor
        image = vae.decode(lat, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return pipe.image_processor.postprocess(image, output_type="np")


def enlarge_pixels(engine: "Engine", hr: HiresRequest, images: Sequence[Any]) -> list[Any]:
    """8-bit RGB arrays -> PIL images at the hires size: Lanczos, or Real-ESRGAN (tiled, up to
    `MAX_MODEL_PASSES` passes until both sides reach the target) then Lanczos to the exact size."""
    import numpy as np
    from PIL import Image

    out = []
    for arr in images:
        if hr.latent_mode is None and hr.upscaler in HIRES_UPSCALERS:  # lanczos
            out.append(Image.fromarray(arr).resize((hr.width, hr.height), Image.LANCZOS))
            continue
        from ..upscale.tiling import Tiler, choose_config

        up = engine.hires_upscaler(hr.upscaler)
        tiler = Tiler(up)
        for _ in range(MAX_MODEL_PASSES):
            h, w = arr.shape[:2]
            if w >= hr.width and h >= hr.height:
                break
            arr = np.concatenate(list(tiler.strips(arr, choose_config(up, w, h, None))), axis=0)
        im = Image.fromarray(arr)
        out.append(im if im.size == (hr.width, hr.height) else im.resize((hr.width, hr.height), Image.LANCZOS))
    return out


def accept_latents(i2i: Any) -> None:
    """Let `i2i` take latents with other than 4 channels as `image` (builtin:demo-sd15 has 8).

    diffusers' img2img takes a tensor as latents only when it has 4 channels and VAE-encodes
    anything else; for such a VAE this does for latents what diffusers does for 4-channel
    ones: noise from the image's generator, added at the first timestep. Set once per pipeline."""
    if getattr(i2i, "_imagegen_accepts_latents", False):
        return
    from diffusers.utils.torch_utils import randn_tensor

    original = i2i.prepare_latents
    channels = i2i.vae.config.latent_channels

    def prepare_latents(image: Any, timestep: Any, batch_size: int, num_images_per_prompt: int, dtype: Any, device: Any,
                        generator: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not (hasattr(image, "shape") and image.ndim == 4 and image.shape[1] == channels):
            return original(image, timestep, batch_size, num_images_per_prompt, dtype, device, generator, *args, **kwargs)
        latents = image.to(device=device, dtype=dtype)
        noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=dtype)
        return i2i.scheduler.add_noise(latents, noise, timestep)

    i2i.prepare_latents = prepare_latents
    i2i._imagegen_accepts_latents = True


def second_pass(engine: "Engine", hr: HiresRequest, first: Any, requests: Sequence[Any], generators: list,
                embeds: dict[str, Any], guidance: float) -> tuple[Any, list[Any] | None]:
    """Run the hires pass on the first pass's output (latents or a float image batch).

    Returns (final images as a (B, H, W, 3) float array, first-pass 8-bit arrays when
    `keep_first`, else None). `generators` are the first pass's, continued."""
    import torch
    import torch.nn.functional as F

    pipe = engine.pipeline
    # 1. Enlarge: interpolate the latents, or decode -> 8-bit -> resize (the encode is img2img's).
    kept = None
    if hr.latent_mode:
        latents = first
        if hr.keep_first:
            kept = [to_uint8(a) for a in decode_latents(pipe, latents)]
        f = pipe.vae_scale_factor  # 8 for SD1.5 and SDXL
        image: Any = F.interpolate(latents, size=(hr.height // f, hr.width // f), mode=hr.latent_mode)
    else:
        arrays = [to_uint8(a) for a in first]
        kept = arrays if hr.keep_first else None
        image = enlarge_pixels(engine, hr, arrays)

    # 2. img2img on the same components, with its own fresh scheduler.
    i2i = engine.img2img_pipeline()
    if hr.latent_mode and pipe.vae.config.latent_channels != 4:
        accept_latents(i2i)
    i2i.scheduler = engine._make_scheduler(hr.scheduler)
    if hasattr(i2i.scheduler, "noise_sampler_seed"):
        i2i.scheduler.noise_sampler_seed = [int(r.seed) for r in requests]
    n, strength = hr.schedule()
    with torch.no_grad():
        out = i2i(image=image, strength=strength, num_inference_steps=n, guidance_scale=guidance,
                  generator=generators, output_type="np", **embeds)
    return out.images, kept
