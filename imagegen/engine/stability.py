"""How well-conditioned a model + LoRA set is for one job: a numerical-stability probe.

Batched and single renders differ in the last bits of their matrix products (different
kernels, different summation order). A well-conditioned model damps that rounding and the two
images agree within 1/255; a chaotic one (a tiny random model with a strong random LoRA, say)
amplifies it into a different picture. The probe renders the job alone, then again with the
LoRA weights moved by `eps` and with the starting noise moved by `eps` (relative), and reports
how far the pixels went. Stable (both moves within `threshold`/255) and yet batch-dependent
means a state bug; unstable means the model itself cannot promise batch invariance for that job.

torch is imported inside functions only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, GenRequest

DEFAULT_EPS = 1e-6  # a perturbation far below what a person could set, far above fp32 rounding
HALF_EPS = 1e-3  # fp16/bf16 cannot represent a 1e-6 move of a weight or of the noise
STABLE_THRESHOLD = 1  # pixel levels (of 255): the batch-invariance tolerance on CPU
NUDGE_SEED = 0x5EED  # the fixed random direction of the noise perturbation


@dataclass(frozen=True)
class Stability:
    """Pixel changes (levels of 255, max and mean over pixels and channels) of one job under
    perturbations of size `eps`. `weight_*` is None when the job has no LoRA; `repeat_max` is
    the same render done twice (0 unless the device is non-deterministic)."""

    eps: float
    threshold: int
    noise_max: int
    noise_mean: float
    weight_max: int | None
    weight_mean: float | None
    repeat_max: int

    @property
    def stable(self) -> bool:
        """True when every perturbation moved pixels by at most `threshold` levels."""
        worst = max(self.noise_max, self.weight_max or 0)
        return worst <= self.threshold

    def summary(self) -> str:
        """One line of figures, e.g. "LoRA weight +1e-06: max 121/255 (mean 9.3); noise +1e-06: ..."."""
        parts = []
        if self.weight_max is not None:
            parts.append(f"LoRA weight +{self.eps:g}: max {self.weight_max}/255 (mean {self.weight_mean:.4f})")
        parts.append(f"starting noise +{self.eps:g}: max {self.noise_max}/255 (mean {self.noise_mean:.4f})")
        parts.append(f"same render twice: max {self.repeat_max}/255")
        return "; ".join(parts)


def default_eps(dtype: str) -> float:
    """The perturbation the probe uses for an engine dtype ("fp32" -> 1e-6, half -> 1e-3)."""
    return DEFAULT_EPS if dtype == "fp32" else HALF_EPS


def probe_stability(
    engine: "Engine", request: "GenRequest", *, eps: float | None = None, threshold: int = STABLE_THRESHOLD
) -> Stability:
    """Render `request` alone three or four times (plain, again, LoRA weights + `eps`, starting
    noise + `eps`) and measure the pixel changes. The engine's LoRA set is restored exactly
    afterwards. `eps` defaults to `default_eps(engine.dtype)`.

    Raises what `Engine.generate` and `Engine.set_loras` raise, and ModelError when a render
    comes back with NaN values (nothing to measure).
    """
    from ..errors import ModelError

    eps = default_eps(engine.dtype) if eps is None else float(eps)

    def render() -> Any:
        [res] = engine.generate([request])
        if res.image is None:
            raise ModelError(f"stability probe: the render failed ({res.error})")
        return _pixels(res.image)

    base = render()
    repeat_max = int(abs(base - render()).max())
    with nudged_latents(engine.pipeline, eps):
        d = abs(base - render())
    noise_max, noise_mean = int(d.max()), float(d.mean())
    weight_max = weight_mean = None
    loras = engine.loras
    if loras:
        try:
            engine.set_loras([(p, w + eps) for p, w in loras])
            d = abs(base - render())
            weight_max, weight_mean = int(d.max()), float(d.mean())
        finally:
            engine.set_loras(loras)
    return Stability(eps, threshold, noise_max, noise_mean, weight_max, weight_mean, repeat_max)


@contextmanager
def nudged_latents(pipeline: Any, eps: float) -> Iterator[None]:
    """While in the block, the pipeline's starting latents are moved by `eps` (relative to the
    noise's scale) in a fixed random direction. The seeded generators are consumed exactly as
    without the nudge, so later sampler noise (ancestral, SDE) is unchanged."""
    import torch

    original = pipeline.prepare_latents  # the bound method; the instance attribute shadows it

    def prepare_latents(*args: Any, **kwargs: Any) -> Any:
        latents = original(*args, **kwargs)
        g = torch.Generator("cpu").manual_seed(NUDGE_SEED)
        direction = torch.randn(latents.shape, generator=g, dtype=torch.float32)
        sigma = float(getattr(pipeline.scheduler, "init_noise_sigma", 1.0))
        return latents + (eps * sigma * direction).to(latents.device, latents.dtype)

    pipeline.prepare_latents = prepare_latents
    try:
        yield
    finally:
        del pipeline.prepare_latents


def _pixels(image: Any) -> Any:
    import numpy as np

    return np.asarray(image.convert("RGB"), dtype=np.int16)
