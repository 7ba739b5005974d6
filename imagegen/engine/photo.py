"""The first pass of a job with an input photo: img2img, or inpainting, on the loaded components.

    img2img     the family's img2img pipeline (`from_pipe`: the same UNet, VAE and encoders),
                `steps` x `denoise` steps of a `steps`-step schedule (diffusers and A1111's img2img)
    inpainting  an ordinary checkpoint (4 latent channels; builtin:demo-sd15 has 8): the same
                img2img pipeline, and after each step the latents outside the mask are put back
                to the photo's latents noised to the next step's level (what diffusers'
                inpainting pipeline does for such UNets, here for any number of latent channels)
                an inpainting checkpoint (9-channel UNet): the family's inpainting pipeline; its
                img2img is the same pipeline with an all-white mask (A1111's way)
    keep_unmasked  after decoding, on the 8-bit image: the photo pasted back where the blurred
                mask is not white (`inputs.paste_unmasked`), so every pixel outside it is the photo's

Noise: one CPU generator per image (the photo's VAE encode, the starting noise and any
sampler noise draw from it in that order), so an image does not depend on its batch. The
latent mask is the blurred mask binarised at 0.5 and reduced by nearest neighbour, as diffusers'
inpainting pipeline does; the generator also makes the one extra draw that pipeline makes for
encoding the masked photo, so that stochastic samplers match it too.

torch and diffusers are imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, GenRequest


@dataclass(frozen=True, eq=False)
class InitRequest:
    """The input photo of a `GenRequest`, prepared at the request's size (`imagegen.inputs`).

    `image`: PIL RGB; `mask`: PIL 8-bit grey, already blurred, white = repaint (None: img2img);
    `final_image` / `final_mask`: the same at a hires pass's size, for the paste-back after it;
    `keep_image`: what is pasted back when it is not `image` (a cut-out's straight colours)."""

    image: Any
    denoise: float
    mask: Any = None
    keep_unmasked: bool = True
    final_image: Any = None
    final_mask: Any = None
    keep_image: Any = None

    @property
    def kind(self) -> tuple[float, bool]:
        """What requests of one batch share: strength and whether there is a mask."""
        return (float(self.denoise), self.mask is not None)


def check_init(first: "GenRequest", requests: Sequence["GenRequest"]) -> None:
    """Raises InputError for input photos or ControlNet units a batch cannot render together or
    at its size."""
    kinds = {None if r.init is None else r.init.kind for r in requests}
    if len(kinds) > 1:
        raise InputError("all requests of a batch must share the input kind (text-to-image, img2img or inpainting) "
                         "and `denoise`")
    if len({tuple(c.settings for c in r.controlnet) for r in requests}) > 1:
        raise InputError("all requests of a batch must share their ControlNet units (model, weight, start, end)")
    size = (first.width, first.height)
    for r in requests:
        for i, c in enumerate(r.controlnet):
            if c.image is None or tuple(c.image.size) != size:
                raise InputError(f"ControlNet {i}: the control image must be {size[0]}x{size[1]} (the request's size)")
            if not 0 <= c.start < c.end <= 1:
                raise InputError(f"ControlNet {i}: `start` and `end` must satisfy 0 <= start < end <= 1")
    init = first.init
    if init is None:
        return
    if not 0 < init.denoise <= 1:
        raise InputError(f"`denoise` must be above 0 and at most 1, got {init.denoise}")
    if int(first.steps * init.denoise) < 1:
        raise InputError(f"`denoise` {init.denoise:g} with {first.steps} steps runs int(steps x denoise) = 0 steps")
    for r in requests:
        for what, im in (("photo", r.init.image), ("mask", r.init.mask)):
            if im is not None and tuple(im.size) != size:
                raise InputError(f"the input {what} is {im.size[0]}x{im.size[1]}, the request {size[0]}x{size[1]}; "
                                 "prepare it at the request's size (imagegen.inputs)")
        if r.hires is not None and r.init.mask is not None and r.init.keep_unmasked:
            want = (r.hires.width, r.hires.height)
            if r.init.final_image is None or r.init.final_mask is None or tuple(r.init.final_image.size) != want:
                raise InputError("a hires request with `keep_unmasked` needs the photo and mask at the hires size "
                                 "(`final_image`, `final_mask`)")


def white_masks(requests: Sequence["GenRequest"]) -> list[Any]:
    """All-white masks (repaint everything): an inpainting model's img2img."""
    from PIL import Image

    return [Image.new("L", (r.width, r.height), 255) for r in requests]


class LatentBlend:
    """Inpainting with an ordinary UNet through the img2img pipeline: captures the photo's
    latents and the starting noise where img2img adds them together (the scheduler's first
    `add_noise`), and after each step puts the latents outside the mask back to the photo's,
    noised to the next step's level (`step`, a `callback_on_step_end`)."""

    def __init__(self, pipe: Any, masks: Sequence[Any], generators: list, width: int, height: int) -> None:
        import torch.nn.functional as F
        from diffusers.image_processor import VaeImageProcessor

        f = pipe.vae_scale_factor
        proc = VaeImageProcessor(vae_scale_factor=f, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        mask = proc.preprocess(list(masks), height=height, width=width)
        self.mask = F.interpolate(mask, size=(height // f, width // f))
        self.pipe = pipe
        self.generators = generators
        self.init: Any = None
        self.noise: Any = None
        sched = pipe.scheduler
        self._add_noise = sched.add_noise

        def add_noise(original: Any, noise: Any, timesteps: Any) -> Any:
            if self.init is None:
                self.init, self.noise = original, noise
                self._masked_image_draw(original)
            return self._add_noise(original, noise, timesteps)

        sched.add_noise = add_noise

    def _masked_image_draw(self, latents: Any) -> None:
        """The generator draw diffusers' inpainting pipeline makes when it VAE-encodes the
        masked photo (a sample of the latent distribution), made here without the encode."""
        import torch

        dtype = self.pipe.vae.dtype
        for g in self.generators:
            torch.randn((1, *latents.shape[1:]), generator=g, device=g.device, dtype=dtype)

    def step(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        import torch

        latents = kwargs["latents"]
        timesteps = pipe.scheduler.timesteps[-pipe._num_timesteps:]  # the ones img2img runs
        proper = self.init
        if i < len(timesteps) - 1:
            proper = self._add_noise(self.init, self.noise, torch.tensor([timesteps[i + 1]]))
        m = self.mask.to(device=latents.device, dtype=latents.dtype)
        return {"latents": (1 - m) * proper.to(latents.dtype) + m * latents}


def first_pass(engine: "Engine", requests: Sequence["GenRequest"], generators: list, embeds: dict[str, Any],
               output_type: str) -> Any:
    """Render the first pass of requests with an input photo and/or ControlNet units; returns the
    pipeline's `images` (a float array, or latents for `output_type="latent"`).

    With ControlNet units, each pipeline below is the family's ControlNet variant of it
    (`controlnet.controlnet_pipeline`, `from_pipe` over the same components), the units'
    control images one per request."""
    first = requests[0]
    init = first.init
    units = control_units(engine, requests)
    common = dict(num_inference_steps=first.steps, guidance_scale=first.guidance, generator=generators,
                  output_type=output_type, **embeds)

    def pipeline(kind: str, plain: Any) -> tuple[Any, dict]:
        from .controlnet import controlnet_pipeline

        pipe, kw = controlnet_pipeline(engine.pipeline, engine.family, units, kind) if units else (plain(), {})
        _fresh_scheduler(engine, pipe, first.scheduler, requests)
        return pipe, kw

    if init is None:  # text-to-image with ControlNet
        pipe, kw = pipeline("txt2img", lambda: engine.pipeline)
        return pipe(width=first.width, height=first.height, **common, **kw).images
    images = [r.init.image for r in requests]
    common["strength"] = float(init.denoise)
    if engine.inpainting:  # 9-channel UNet: the inpainting pipeline, its own conditioning
        pipe, kw = pipeline("inpaint", engine.inpaint_pipeline)
        masks = [r.init.mask for r in requests] if init.mask is not None else white_masks(requests)
        return pipe(image=images, mask_image=masks, width=first.width, height=first.height, **common, **kw).images
    i2i, kw = pipeline("img2img", engine.img2img_pipeline)
    if init.mask is None:
        return i2i(image=images, **common, **kw).images
    blend = LatentBlend(i2i, [r.init.mask for r in requests], generators, first.width, first.height)
    return i2i(image=images, callback_on_step_end=blend.step, callback_on_step_end_tensor_inputs=["latents"], **common,
               **kw).images


def control_units(engine: "Engine", requests: Sequence["GenRequest"]) -> list[Any]:
    """The batch's ControlNet units: each unit's model (loaded once) and its control images,
    one per request."""
    from .controlnet import ControlUnit

    first = requests[0]
    return [ControlUnit(engine.controlnet(c.model), [r.controlnet[i].image for r in requests], c.weight, c.start, c.end)
            for i, c in enumerate(first.controlnet)]


def _fresh_scheduler(engine: "Engine", pipe: Any, name: str, requests: Sequence["GenRequest"]) -> None:
    """A fresh scheduler on `pipe` (the first pass's), SDE noise seeded per image."""
    pipe.scheduler = engine._make_scheduler(name)
    if hasattr(pipe.scheduler, "noise_sampler_seed"):
        pipe.scheduler.noise_sampler_seed = [int(r.seed) for r in requests]


def paste_back(image: Any, init: InitRequest | None, *, hires: bool) -> Any:
    """`image` with the photo pasted back outside the mask when the request asks for it (the
    photo and mask at the hires size when `image` is a hires pass's)."""
    if init is None or init.mask is None or not init.keep_unmasked:
        return image
    from ..inputs import paste_unmasked

    photo, mask = (init.final_image, init.final_mask) if hires else (init.image if init.keep_image is None else init.keep_image, init.mask)
    return paste_unmasked(image, photo, mask)
