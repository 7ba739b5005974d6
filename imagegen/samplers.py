"""The one list of sampler (scheduler) names that recipes may use, shared by the recipe
validator and the engine. Pure data: no torch, no diffusers import.

A1111 writes a sampler as two infotext fields since v1.8: `Sampler: DPM++ 2M` and
`Schedule type: Karras`; older files fold the schedule into the name (`DPM++ 2M Karras`).
Both spellings are accepted here, and diffusers class names map to themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplerSpec:
    """How to build one sampler: a diffusers scheduler class and the options it needs."""

    name: str  # canonical recipe name, e.g. "DPM++ 2M Karras"
    diffusers_class: str  # e.g. "DPMSolverMultistepScheduler"
    options: dict = field(default_factory=dict)  # passed to `from_config`
    a1111_sampler: str = ""  # the infotext `Sampler:` value
    schedule_type: str = ""  # the infotext `Schedule type:` value ("" = Automatic)


def _spec(name: str, cls: str, a1111: str, schedule: str = "", **options: object) -> SamplerSpec:
    return SamplerSpec(name, cls, dict(options), a1111, schedule)


_KARRAS = {"use_karras_sigmas": True}

# A1111 name -> diffusers scheduler, after diffusers' own "A1111 / k-diffusion" mapping table.
SAMPLERS: tuple[SamplerSpec, ...] = (
    _spec("Euler", "EulerDiscreteScheduler", "Euler"),
    _spec("Euler a", "EulerAncestralDiscreteScheduler", "Euler a"),
    _spec("Heun", "HeunDiscreteScheduler", "Heun"),
    _spec("LMS", "LMSDiscreteScheduler", "LMS"),
    _spec("LMS Karras", "LMSDiscreteScheduler", "LMS", "Karras", **_KARRAS),
    _spec("DPM2", "KDPM2DiscreteScheduler", "DPM2"),
    _spec("DPM2 Karras", "KDPM2DiscreteScheduler", "DPM2", "Karras", **_KARRAS),
    _spec("DPM2 a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    _spec("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", "DPM2 a", "Karras", **_KARRAS),
    _spec("DPM++ 2M", "DPMSolverMultistepScheduler", "DPM++ 2M"),
    _spec("DPM++ 2M Karras", "DPMSolverMultistepScheduler", "DPM++ 2M", "Karras", **_KARRAS),
    _spec("DPM++ 2M SDE", "DPMSolverMultistepScheduler", "DPM++ 2M SDE", algorithm_type="sde-dpmsolver++"),
    _spec(
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE",
        "Karras",
        algorithm_type="sde-dpmsolver++",
        **_KARRAS,
    ),
    _spec("DPM++ SDE", "DPMSolverSinglestepScheduler", "DPM++ SDE"),
    _spec("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", "DPM++ SDE", "Karras", **_KARRAS),
    _spec("DDIM", "DDIMScheduler", "DDIM"),
    _spec("PLMS", "PNDMScheduler", "PLMS"),
    _spec("UniPC", "UniPCMultistepScheduler", "UniPC"),
)

# diffusers class names accepted as they are (with the model's own scheduler config).
DIFFUSERS_CLASSES: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)

_BY_KEY = {s.name.lower(): s for s in SAMPLERS}
_BY_KEY.update({c.lower(): SamplerSpec(c, c, {}, c, "") for c in DIFFUSERS_CLASSES})


def sampler_names() -> list[str]:
    """Every name a recipe may use, A1111 names first."""
    return [s.name for s in SAMPLERS] + list(DIFFUSERS_CLASSES)


def lookup_sampler(name: str) -> SamplerSpec | None:
    """The spec for `name` (case-insensitive; `"DPM++ 2M" + "Karras"` spellings), or None."""
    key = " ".join(str(name).split()).lower()
    return _BY_KEY.get(key)


def from_infotext(sampler: str, schedule_type: str = "") -> SamplerSpec | None:
    """Map A1111 infotext fields (`Sampler`, `Schedule type`) back to a spec."""
    sched = schedule_type.strip()
    if sched and sched.lower() not in ("automatic", ""):
        spec = lookup_sampler(f"{sampler} {sched}")
        if spec is not None:
            return spec
    return lookup_sampler(sampler)
