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
from typing import Iterator, Sequence

from imagegen.recipe import LoraUse, PromptVariant, Recipe, axis_counts, lora_choices

ID_LENGTH = 12


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
    prompt_syntax: str = "a1111"
    emphasis: str = "original"
    embeddings: tuple[str, ...] = ()  # textual-inversion files the prompt or negative uses

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys render in one batch group (same model state and latents shape)."""
        return (self.checkpoint, self.vae, self.loras, self.width, self.height, self.steps, self.scheduler, self.guidance, self.clip_skip)

    def content(self) -> dict:
        """The canonical content its id hashes (and that reproduces its image)."""
        return canonical_content(
            checkpoint=self.checkpoint, vae=self.vae, loras=self.loras, prompt=self.prompt, negative=self.negative,
            seed=self.seed, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance,
            scheduler=self.scheduler, clip_skip=self.clip_skip, prompt_syntax=self.prompt_syntax, emphasis=self.emphasis,
            embeddings=self.embeddings,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = dict(self.axes)
        return d


def canonical_content(*, checkpoint: str, vae: str | None, loras: tuple[LoraUse, ...], prompt: str, negative: str,
                      seed: int, width: int, height: int, steps: int, guidance: float, scheduler: str, clip_skip: int,
                      prompt_syntax: str = "a1111", emphasis: str = "original", embeddings: tuple[str, ...] = ()) -> dict:
    """What a job's id is the hash of (and what reproduces its image). Prompt-syntax keys appear
    only when they differ from the defaults, so ids of earlier jobs stay as they were."""
    extra: dict = {}
    if prompt_syntax != "a1111":
        extra["prompt_syntax"] = prompt_syntax
    if emphasis != "original":
        extra["emphasis"] = emphasis
    if embeddings:
        extra["embeddings"] = list(embeddings)
    return {**extra,
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


def count_jobs(recipe: Recipe) -> int:
    """The number of jobs `plan(recipe)` returns, without building them."""
    total = 1
    for _, n in axis_counts(recipe):
        total *= n
    return total


PROMPT_LABEL_CHARS = 48  # prompt text shown in an axis label (sheets, captions, filters)


def prompt_labels(variants: Sequence[PromptVariant]) -> list[str]:
    """One short label per prompt variant: `#N` and the text, or, for a long prompt, the words
    that tell it apart from the other variants (`#2 …evening light`), never a cut that hides them.

    The words shared by every variant at the start and at the end are left out (with `…`)
    when the whole text does not fit in PROMPT_LABEL_CHARS."""
    words = [pv.text.split() for pv in variants]
    prefix = suffix = 0
    if len(words) > 1:
        shortest = min(len(w) for w in words)
        while prefix < shortest and all(w[prefix] == words[0][prefix] for w in words):
            prefix += 1
        while suffix < shortest - prefix and all(w[-1 - suffix] == words[0][-1 - suffix] for w in words):
            suffix += 1
    labels = []
    for number, (pv, ws) in enumerate(zip(variants, words), 1):
        text = pv.text
        middle = ws[prefix : len(ws) - suffix]
        if len(text) > PROMPT_LABEL_CHARS and middle:
            text = ("…" if prefix else "") + " ".join(middle) + ("…" if suffix else "")
        if len(text) > PROMPT_LABEL_CHARS:
            text = text[: PROMPT_LABEL_CHARS - 1] + "…"
        labels.append(f"#{number} {text}")
    return labels


def iter_jobs(recipe: Recipe) -> Iterator[Job]:
    """Jobs in plan order (see the module docstring)."""
    index = 0
    labels = prompt_labels(recipe.prompts)
    for lora_set, stack, lora_labels in lora_choices(recipe):
        for (w, h), steps, scheduler, guidance in itertools.product(recipe.sizes, recipe.steps, recipe.schedulers, recipe.guidance):
            for number, pv in enumerate(recipe.prompts, 1):
                loras = stack + tuple(LoraUse(p, n, wt) for p, n, wt in pv.loras)  # `<lora:...>` tags
                for seed in recipe.seeds:
                    index += 1
                    content = canonical_content(
                        checkpoint=recipe.checkpoint, vae=recipe.vae, loras=loras, prompt=pv.text, negative=recipe.negative,
                        seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler, clip_skip=recipe.clip_skip,
                        prompt_syntax=recipe.prompt_syntax, emphasis=recipe.emphasis, embeddings=pv.embeddings,
                    )
                    axes = lora_labels + (
                        ("size", f"{w}x{h}"),
                        ("steps", str(steps)),
                        ("scheduler", scheduler),
                        ("guidance", f"{guidance:g}"),
                        ("prompt", labels[number - 1]),
                        ("seed", str(seed)),
                    )
                    yield Job(
                        index=index, id=job_id(content), checkpoint=recipe.checkpoint, family=recipe.family, vae=recipe.vae,
                        loras=loras, lora_set=lora_set, prompt=pv.text, negative=recipe.negative, template=pv.template,
                        variant=number, seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler,
                        clip_skip=recipe.clip_skip, axes=axes, prompt_syntax=recipe.prompt_syntax, emphasis=recipe.emphasis,
                        embeddings=pv.embeddings,
                    )


def plan(recipe: Recipe) -> list[Job]:
    """Every job of the recipe, in plan order."""
    return list(iter_jobs(recipe))
