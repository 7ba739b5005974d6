"""In which dtype, and whether in slices, the VAE decodes a batch.

diffusers' SDXL pipeline upcasts its VAE to fp32 for every decode when the VAE is fp16 and its
config says `force_upcast` (the original SDXL VAE overflows in fp16). On CUDA that is the
slowest and largest step after the denoise. Here, on CUDA only:

- the fp16-safe VAE (`force_upcast: false` in its config, e.g. madebyollin/sdxl-vae-fp16-fix)
  decodes in fp16, as loaded;
- the original VAE decodes in bf16 where the GPU has bf16 (same exponent range as fp32, so it
  does not overflow; converted once, when the engine first renders), else in fp32 as
  diffusers does;
- either way one latent at a time (`use_slicing`), so the decode's peak memory does not grow
  with the batch.

On CPU nothing changes (fp32 as loaded), so CPU pixels stay what they were.

Expected pixel difference of the bf16 decode against fp32: a few levels out of 255 at most
(bf16 keeps 8 bits of mantissa), not measured on a GPU yet. On CPU the tiny random SDXL VAE
forced to bf16 differs from fp32 by at most 4/255 (mean 0.45/255) in a plain decode, 9/255
through a hires pass (decode, encode, decode); see tests/test_vae_decode.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class DecodePlan:
    """`dtype`: the VAE's dtype during the decode ("fp16" | "bf16" | "fp32"), None = as loaded
    (and as diffusers chooses); `slicing`: decode one latent at a time."""

    dtype: str | None
    slicing: bool
    reason: str


def decode_plan(device: str, family: str, vae_dtype: str, force_upcast: bool, bf16_supported: bool) -> DecodePlan:
    """The decode plan for an SDXL or SD1.5 VAE of `vae_dtype` ("fp16" | "bf16" | "fp32") on
    `device`, whose config says `force_upcast`, on a GPU with or without bf16. Pure: no torch."""
    if not device.startswith("cuda"):
        return DecodePlan(None, False, "CPU: the VAE decodes as loaded (fp32)")
    if family != "sdxl":
        return DecodePlan(None, False, "SD1.5: the VAE decodes in the model's dtype, as diffusers does")
    if vae_dtype != "fp16":
        return DecodePlan(None, True, f"the VAE is {vae_dtype}: decoded as loaded, in slices")
    if not force_upcast:
        return DecodePlan("fp16", True, "fp16-safe VAE (force_upcast false): fp16, in slices")
    if bf16_supported:
        return DecodePlan("bf16", True, "the original SDXL VAE overflows in fp16: bf16, in slices")
    return DecodePlan(None, True, "no bf16 on this GPU: diffusers' fp32 upcast, in slices")


def plan_for(pipe: Any, device: str, family: str) -> DecodePlan:
    """`decode_plan` for the pipeline's VAE on `device`."""
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None:
        return DecodePlan(None, False, "no VAE")
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}.get(vae.dtype, str(vae.dtype))
    bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return decode_plan(device, family, short, bool(getattr(vae.config, "force_upcast", False)), bf16)


def apply_plan(vae: Any, plan: DecodePlan) -> None:
    """Put `vae` in the plan's dtype once, for good (converting it back and forth per batch
    would round its weights each time), with diffusers' fp32 upcast off for a bf16 or fp16-safe
    VAE (its img2img upcasts on `force_upcast` alone, whatever the dtype), and slices on."""
    if vae is None:
        return
    import torch

    target = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(plan.dtype or "")
    if target is not None:
        if vae.dtype != target:
            vae.to(dtype=target)
        if target != torch.float32 and getattr(vae.config, "force_upcast", False):
            vae.register_to_config(force_upcast=False)
    if plan.slicing and hasattr(vae, "use_slicing"):
        vae.use_slicing = True


@contextmanager
def decoding(vae: Any, plan: DecodePlan) -> Iterator[None]:
    """While in the block, what `vae.encode` / `vae.decode` get is cast to the VAE's own dtype
    (the pipeline hands them the UNet's: fp16 latents to a bf16 VAE). Nothing is installed for
    a plan that keeps the loaded dtype (CPU)."""
    if vae is None or plan.dtype is None:
        yield
        return
    inner = {name: vae.__dict__.get(name) for name in ("encode", "decode")}  # other wrappers (decode_in_slices_on_oom)

    def cast(call: Any) -> Any:
        def run(x: Any, *args: Any, **kwargs: Any) -> Any:
            return call(x.to(vae.dtype) if x.dtype != vae.dtype else x, *args, **kwargs)

        return run

    vae.encode, vae.decode = cast(vae.encode), cast(vae.decode)
    try:
        yield
    finally:
        for name, wrapper in inner.items():
            if wrapper is None:
                del vae.__dict__[name]
            else:
                setattr(vae, name, wrapper)
