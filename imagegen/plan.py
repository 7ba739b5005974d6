"""`Recipe` -> ordered list of frozen `Job`s. Pure: no torch, no disk.

Order (outermost first), chosen so that what is costly to switch changes least often:

    LoRA set > each LoRA's weight > size > steps > scheduler > guidance > prompt variant > seed

Jobs that share everything but prompt and seed are therefore contiguous, and each LoRA
stack is applied once per run. Each job has a 1-based `index` (what people say: "I pick 42")
and an `id`: the first 12 hex digits of the sha256 of its canonical content, so an unchanged
job keeps its id when the recipe is edited elsewhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from typing import Iterator

from imagegen.recipe import PromptVariant, Recipe

ID_LENGTH = 12

# Axis keys as they appear in `Job.axes`, plans and contact-sheet legends.
AXIS_LORA_SET = "lora_set"
AXIS_LORA_PREFIX = "lora:"
AXES_FIXED = ("size", "steps", "scheduler", "guidance", "prompt", "seed")


@dataclass(frozen=True)
class LoraUse:
    """A LoRA applied to a job, with its weight."""

    path: str
    name: str
    weight: float


@dataclass(frozen=True)
class Job:
    """One image to render: everything needed to make (and remake) it."""

    index: int
    id: str
    checkpoint: str
    family: str
    vae: str | None
    loras: tuple[LoraUse, ...]
    lora_set: str | None
    prompt: str
    negative: str
    template: int  # 0-based prompt template
    variant: int  # 1-based variant number across all templates
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    clip_skip: int
    axes: tuple[tuple[str, str], ...]  # (axis key, value label) for every axis, in plan order

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys render in one batch group (same model state and latents shape)."""
        return (self.checkpoint, self.vae, self.loras, self.width, self.height, self.steps, self.scheduler, self.guidance, self.clip_skip)

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        return tuple((lu.path, lu.weight) for lu in self.loras)

    def content(self) -> dict:
        """The canonical content its id hashes (and that reproduces its image)."""
        return canonical_content(
            checkpoint=self.checkpoint, vae=self.vae, loras=self.loras, prompt=self.prompt, negative=self.negative,
            seed=self.seed, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance,
            scheduler=self.scheduler, clip_skip=self.clip_skip,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = dict(self.axes)
        return d


def canonical_content(*, checkpoint: str, vae: str | None, loras: tuple[LoraUse, ...], prompt: str, negative: str,
                      seed: int, width: int, height: int, steps: int, guidance: float, scheduler: str, clip_skip: int) -> dict:
    """What a job's id is the hash of (and what reproduces its image)."""
    return {
        "model": checkpoint,
        "vae": vae,
        "loras": [[lu.path, float(lu.weight)] for lu in loras],
        "prompt": prompt,
        "negative": negative,
        "seed": int(seed),
        "size": [int(width), int(height)],
        "steps": int(steps),
        "guidance": float(guidance),
        "scheduler": scheduler,
        "clip_skip": int(clip_skip),
    }


def job_id(content: dict) -> str:
    """Short stable hash of canonical job content."""
    blob = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:ID_LENGTH]


def _lora_choices(recipe: Recipe) -> list[tuple[str | None, tuple[LoraUse, ...], tuple[tuple[str, str], ...]]]:
    """Every LoRA stack the recipe sweeps: (set name, stack, axis labels)."""
    sets = recipe.lora_sets or (None,)
    weight_axes = [spec.weights for spec in recipe.loras]
    out = []
    for lora_set in sets:
        for weights in itertools.product(*weight_axes):
            stack = [LoraUse(s.path, s.name, w) for s, w in zip(recipe.loras, weights)]
            labels = [(AXIS_LORA_SET, lora_set.name)] if lora_set is not None else []
            labels += [(AXIS_LORA_PREFIX + s.name, f"{w:g}") for s, w in zip(recipe.loras, weights)]
            if lora_set is not None:
                stack += [LoraUse(p, n, w) for p, n, w in lora_set.loras]
            out.append((lora_set.name if lora_set else None, tuple(stack), tuple(labels)))
    return out


def axis_counts(recipe: Recipe) -> list[tuple[str, int]]:
    """(label, number of values) per axis, in plan order; their product is the job count."""
    counts = [("LoRA sets", len(recipe.lora_sets) or 1)]
    counts += [(f"weights of LoRA {s.name}", len(s.weights)) for s in recipe.loras]
    counts += [
        ("sizes", len(recipe.sizes)),
        ("step counts", len(recipe.steps)),
        ("schedulers", len(recipe.schedulers)),
        ("guidance values", len(recipe.guidance)),
        ("prompt variants", len(recipe.prompts)),
        ("seeds", len(recipe.seeds)),
    ]
    return counts


def count_jobs(recipe: Recipe) -> int:
    """The number of jobs `plan(recipe)` returns, without building them."""
    total = 1
    for _, n in axis_counts(recipe):
        total *= n
    return total


def _prompt_label(number: int, pv: PromptVariant) -> str:
    text = pv.text if len(pv.text) <= 48 else pv.text[:47] + "…"
    return f"#{number} {text}"


def iter_jobs(recipe: Recipe) -> Iterator[Job]:
    """Jobs in plan order (see the module docstring)."""
    index = 0
    for lora_set, stack, lora_labels in _lora_choices(recipe):
        for (w, h), steps, scheduler, guidance in itertools.product(recipe.sizes, recipe.steps, recipe.schedulers, recipe.guidance):
            for number, pv in enumerate(recipe.prompts, 1):
                for seed in recipe.seeds:
                    index += 1
                    content = canonical_content(
                        checkpoint=recipe.checkpoint, vae=recipe.vae, loras=stack, prompt=pv.text, negative=recipe.negative,
                        seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler, clip_skip=recipe.clip_skip,
                    )
                    axes = lora_labels + (
                        ("size", f"{w}x{h}"),
                        ("steps", str(steps)),
                        ("scheduler", scheduler),
                        ("guidance", f"{guidance:g}"),
                        ("prompt", _prompt_label(number, pv)),
                        ("seed", str(seed)),
                    )
                    yield Job(
                        index=index, id=job_id(content), checkpoint=recipe.checkpoint, family=recipe.family, vae=recipe.vae,
                        loras=stack, lora_set=lora_set, prompt=pv.text, negative=recipe.negative, template=pv.template,
                        variant=number, seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler,
                        clip_skip=recipe.clip_skip, axes=axes,
                    )


def plan(recipe: Recipe) -> list[Job]:
    """Every job of the recipe, in plan order."""
    return list(iter_jobs(recipe))


def axis_values(jobs: list[Job]) -> dict[str, list[str]]:
    """Distinct value labels per axis key, in first-seen order."""
    seen: dict[str, dict[str, None]] = {}
    for job in jobs:
        for key, label in job.axes:
            seen.setdefault(key, {})[label] = None
    return {key: list(vals) for key, vals in seen.items()}
