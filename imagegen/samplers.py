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
# Each name fixes its sampler completely: see `scheduler_config` for what the model's own
# scheduler config may still decide.
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
    # A1111's DPM++ SDE is stochastic (Brownian-tree noise, two model calls per step): diffusers'
    # DPMSolverSDEScheduler, with the tree seeded per image by the engine (needs torchsde).
    _spec("DPM++ SDE", "DPMSolverSDEScheduler", "DPM++ SDE"),
    _spec("DPM++ SDE Karras", "DPMSolverSDEScheduler", "DPM++ SDE", "Karras", **_KARRAS),
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

# What a model's scheduler config decides for an A1111-named sampler: the trained noise schedule
# and what the network predicts. Everything else (Karras sigmas, SDE variants, timestep spacing,
# solver order) comes from the sampler name and the class defaults, so a folder shipped with a
# customised scheduler cannot turn "DPM++ 2M" into "DPM++ 2M SDE Karras", and k-diffusion
# samplers start from t=999 as A1111 does ("linspace" spacing). DDIM and PLMS keep the model's
# own config (A1111's DDIM uses the "leading" spacing with steps_offset=1).
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
              "rescale_betas_zero_snr", "steps_offset")
KEEP_MODEL_CONFIG = ("DDIM", "PLMS")

_BY_KEY = {s.name.lower(): s for s in SAMPLERS}
_BY_KEY.update({c.lower(): SamplerSpec(c, c, {}, c, "") for c in DIFFUSERS_CLASSES})


def sampler_names() -> list[str]:
    """Every name a recipe may use, A1111 names first."""
    return [s.name for s in SAMPLERS] + list(DIFFUSERS_CLASSES)


def lookup_sampler(name: str) -> SamplerSpec | None:
    """The spec for `name` (case-insensitive; `"DPM++ 2M" + "Karras"` spellings), or None."""
    key = " ".join(str(name).split()).lower()
    return _BY_KEY.get(key)


# A1111 >= 1.9 reads a missing (or "Automatic") `Schedule type` as the sampler's own default
# schedule. Where that default is not the plain one our spec builds, the infotext must say
# "Uniform" explicitly, or A1111 re-runs e.g. our `DPM++ 2M` as `DPM++ 2M Karras`.
A1111_DEFAULT_SCHEDULE: dict[str, str] = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "DPM++ 2M SDE": "Exponential",
}
UNIFORM = "Uniform"


def infotext_schedule(spec: SamplerSpec) -> str:
    """The `Schedule type:` value to write for `spec` ("" = leave the field out: A1111's
    Automatic means the same schedule)."""
    if spec.schedule_type:
        return spec.schedule_type
    return UNIFORM if spec.a1111_sampler in A1111_DEFAULT_SCHEDULE else ""


def from_infotext(sampler: str, schedule_type: str = "", *, a1111_defaults: bool = True) -> SamplerSpec | None:
    """Map A1111 infotext fields (`Sampler`, `Schedule type`) back to a spec.

    A missing or "Automatic" schedule means the sampler's A1111 default (`A1111_DEFAULT_SCHEDULE`)
    when `a1111_defaults` (A1111 >= 1.9), else the plain schedule (older files, and imagegen's
    own files, which always write the schedule where it matters); "Uniform" is the plain one."""
    sched = schedule_type.strip()
    if sched.lower() in ("", "automatic"):
        sched = A1111_DEFAULT_SCHEDULE.get(" ".join(sampler.split()), "") if a1111_defaults else ""
    if sched and sched.lower() != UNIFORM.lower():
        spec = lookup_sampler(f"{sampler} {sched}")
        if spec is not None:
            return spec
    return lookup_sampler(sampler)


def scheduler_config(spec: SamplerSpec, model_config: dict) -> dict:
    """The config to build `spec`'s diffusers class from (then add `spec.options`): the whole
    model scheduler config for DDIM, PLMS and diffusers class names, else only MODEL_KEYS.

    To build the same scheduler in plain diffusers:
    `getattr(diffusers, spec.diffusers_class).from_config(scheduler_config(spec, pipe.scheduler.config), **spec.options)`."""
    if spec.name in KEEP_MODEL_CONFIG or spec.name == spec.diffusers_class:
        return dict(model_config)
    return {k: v for k, v in model_config.items() if k in MODEL_KEYS}
