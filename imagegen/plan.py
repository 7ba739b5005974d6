"""`Recipe` -> ordered list of frozen `Job`s. Pure: no torch, no disk.

Order (outermost first), chosen so that what is costly to switch changes least often:

    LoRA set > each LoRA's weight > size > hires size > hires denoise > steps > scheduler
    > guidance > input photo > input denoise > each ControlNet's weight > prompt variant > seed

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

from imagegen.inputs import ALPHA, InputFile
from imagegen.recipe import LoraUse, PromptVariant, Recipe, axis_counts, hires_label, hires_size, lora_choices

ID_LENGTH = 12


@dataclass(frozen=True)
class HiresPass:
    """A job's second pass (A1111's Hires. fix): enlarge the first pass, then img2img at
    `width`x`height` for `steps` steps at strength `denoise`. `given` is the target as the
    recipe wrote it (("scale", 1.5) or ("width", 1536)), for the infotext."""

    width: int
    height: int
    upscaler: str  # a defaults.HIRES_UPSCALERS name or an absolute weight-file path
    denoise: float
    steps: int
    scheduler: str
    given: tuple[str, float | int]
    keep_first: bool = False  # also write the first pass's image (not part of the id: same pixels)

    def content(self) -> dict:
        return {"size": [int(self.width), int(self.height)], "upscaler": self.upscaler, "denoise": float(self.denoise),
                "steps": int(self.steps), "scheduler": self.scheduler}


@dataclass(frozen=True)
class JobInput:
    """A job's input photo (img2img; inpainting with a mask). Files are named by path for
    reading and by sha256 in the id: a new photo under the same name is a new job."""

    photo: str  # absolute path
    photo_sha256: str
    denoise: float  # img2img strength: int(steps * denoise) steps run
    mask: str | None = None  # a mask file's path, "alpha" (the photo's transparency), or None: img2img
    mask_sha256: str | None = None
    mask_blur: float = 4.0  # px
    keep_unmasked: bool = True  # the photo pasted back outside the blurred mask

    def content(self) -> dict:
        out: dict = {"photo": self.photo_sha256, "denoise": float(self.denoise)}
        if self.mask is not None:
            out |= {"mask": ALPHA if self.mask == ALPHA else self.mask_sha256, "mask_blur": float(self.mask_blur),
                    "keep_unmasked": bool(self.keep_unmasked)}
        return out


@dataclass(frozen=True)
class ControlUse:
    """One ControlNet unit of a job. `image` None: the control image is made from the job's photo."""

    model: str  # absolute path of the .safetensors ControlNet
    image: str | None
    image_sha256: str | None
    preprocess: str  # "none" | "canny"
    low: int
    high: int
    weight: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start (fraction of the steps)
    end: float

    def content(self) -> dict:
        out: dict = {"model": self.model, "image": self.image_sha256 or "photo", "preprocess": self.preprocess,
                     "weight": float(self.weight), "start": float(self.start), "end": float(self.end)}
        if self.preprocess == "canny":
            out |= {"low": int(self.low), "high": int(self.high)}
        return out

    @property
    def settings(self) -> tuple:
        """What a batch shares (everything but the control image)."""
        return (self.model, self.preprocess, self.low, self.high, self.weight, self.start, self.end)


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
    hires: HiresPass | None = None  # the second pass, when the recipe has `hires:`
    input: JobInput | None = None  # the input photo (img2img, inpainting), when the recipe has `init_image:`
    controlnet: tuple[ControlUse, ...] = ()  # ControlNet units, when the recipe has `controlnet:`

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys render in one batch group (same model state and latents shape,
        one pipeline kind and strength; photos, masks and control images may differ)."""
        kind = None if self.input is None else (self.input.denoise, self.input.mask is not None)
        return (self.checkpoint, self.vae, self.loras, self.width, self.height, self.steps, self.scheduler, self.guidance,
                self.clip_skip, self.hires, kind, tuple(c.settings for c in self.controlnet))

    def content(self) -> dict:
        """The canonical content its id hashes (and that reproduces its image)."""
        return canonical_content(
            checkpoint=self.checkpoint, vae=self.vae, loras=self.loras, prompt=self.prompt, negative=self.negative,
            seed=self.seed, width=self.width, height=self.height, steps=self.steps, guidance=self.guidance,
            scheduler=self.scheduler, clip_skip=self.clip_skip, prompt_syntax=self.prompt_syntax, emphasis=self.emphasis,
            embeddings=self.embeddings, hires=self.hires, input=self.input, controlnet=self.controlnet,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = dict(self.axes)
        return d


def canonical_content(*, checkpoint: str, vae: str | None, loras: tuple[LoraUse, ...], prompt: str, negative: str,
                      seed: int, width: int, height: int, steps: int, guidance: float, scheduler: str, clip_skip: int,
                      prompt_syntax: str = "a1111", emphasis: str = "original", embeddings: tuple[str, ...] = (),
                      hires: HiresPass | None = None, input: JobInput | None = None,
                      controlnet: tuple[ControlUse, ...] = ()) -> dict:
    """What a job's id is the hash of (and what reproduces its image). Prompt-syntax keys appear
    only when they differ from the defaults, `hires` only when the job has a second pass, and
    `input` / `controlnet` only when it has them, so ids of earlier jobs stay as they were."""
    extra: dict = {}
    if prompt_syntax != "a1111":
        extra["prompt_syntax"] = prompt_syntax
    if emphasis != "original":
        extra["emphasis"] = emphasis
    if embeddings:
        extra["embeddings"] = list(embeddings)
    if hires is not None:
        extra["hires"] = hires.content()
    if input is not None:
        extra["input"] = input.content()
    if controlnet:
        extra["controlnet"] = [c.content() for c in controlnet]
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
    hr = recipe.hires
    targets = hr.targets if hr else (None,)
    denoises = hr.denoise if hr else (None,)
    ins = recipe.inputs
    photos: list[tuple[JobInput | None, tuple]] = [(None, ())]
    if ins.photos:
        photos = []
        for photo, label, mask in zip(ins.photos, ins.labels, ins.masks):
            for d in ins.denoise:
                mask_path = mask if mask == ALPHA else (mask.path if isinstance(mask, InputFile) else None)
                mask_sha = mask.sha256 if isinstance(mask, InputFile) else None
                photos.append((JobInput(photo.path, photo.sha256, d, mask_path, mask_sha, ins.mask_blur, ins.keep_unmasked),
                               (("input", label), ("input_denoise", f"{d:g}"))))
    controls: list[tuple[tuple[ControlUse, ...], tuple]] = [((), ())]
    if ins.controlnet:
        controls = []
        for weights in itertools.product(*(u.weights for u in ins.controlnet)):
            units = tuple(ControlUse(u.model, u.image.path if u.image else None, u.image.sha256 if u.image else None,
                                     u.preprocess, u.low, u.high, wt, u.start, u.end) for u, wt in zip(ins.controlnet, weights))
            cn_labels = tuple((f"controlnet:{i}", f"{wt:g}") for i, wt in enumerate(weights))
            controls.append((units, cn_labels))
    for lora_set, stack, lora_labels in lora_choices(recipe):
        for (w, h), target, denoise, steps, scheduler, guidance, (job_input, input_axes), (units, cn_axes) in itertools.product(
                recipe.sizes, targets, denoises, recipe.steps, recipe.schedulers, recipe.guidance, photos, controls):
            hires = None
            hires_axes: tuple[tuple[str, str], ...] = ()
            if hr is not None:
                hw, hh = hires_size(w, h, target)
                hires = HiresPass(hw, hh, hr.upscaler, denoise, hr.steps or steps, hr.scheduler or scheduler, target, hr.keep_first)
                hires_axes = (("hires", f"{hires_label(target)} {hw}x{hh}"), ("denoise", f"{denoise:g}"))
            for number, pv in enumerate(recipe.prompts, 1):
                loras = stack + tuple(LoraUse(p, n, wt) for p, n, wt in pv.loras)  # `<lora:...>` tags
                for seed in recipe.seeds:
                    index += 1
                    content = canonical_content(
                        checkpoint=recipe.checkpoint, vae=recipe.vae, loras=loras, prompt=pv.text, negative=recipe.negative,
                        seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler, clip_skip=recipe.clip_skip,
                        prompt_syntax=recipe.prompt_syntax, emphasis=recipe.emphasis, embeddings=pv.embeddings, hires=hires,
                        input=job_input, controlnet=units,
                    )
                    axes = lora_labels + (("size", f"{w}x{h}"),) + hires_axes + (
                        ("steps", str(steps)),
                        ("scheduler", scheduler),
                        ("guidance", f"{guidance:g}"),
                    ) + input_axes + cn_axes + (
                        ("prompt", labels[number - 1]),
                        ("seed", str(seed)),
                    )
                    yield Job(
                        index=index, id=job_id(content), checkpoint=recipe.checkpoint, family=recipe.family, vae=recipe.vae,
                        loras=loras, lora_set=lora_set, prompt=pv.text, negative=recipe.negative, template=pv.template,
                        variant=number, seed=seed, width=w, height=h, steps=steps, guidance=guidance, scheduler=scheduler,
                        clip_skip=recipe.clip_skip, axes=axes, prompt_syntax=recipe.prompt_syntax, emphasis=recipe.emphasis,
                        embeddings=pv.embeddings, hires=hires, input=job_input, controlnet=units,
                    )


def pixel_summary(jobs: list[Job]) -> str:
    """What the jobs cost in pixels, per pass: `each job renders 1024x1024 (1.05 MP), then a hires
    pass at 1536x1536 (2.36 MP); 3.41 MP per job, 3.41 MP in all`."""
    if not jobs:
        return "no jobs"

    def mp(n: float) -> str:
        return f"{n / 1e6:.2f} MP" if n >= 100_000 else f"{round(n):,} px"

    def sizes(pairs: list[tuple[int, int]]) -> str:
        uniq = list(dict.fromkeys(pairs))
        shown = ", ".join(f"{w}x{h} ({mp(w * h)})" for w, h in uniq[:4])
        return shown + (f" and {len(uniq) - 4} more" if len(uniq) > 4 else "")

    first = [(j.width, j.height) for j in jobs]
    second = [(j.hires.width, j.hires.height) for j in jobs if j.hires]
    total = sum(w * h for w, h in first) + sum(w * h for w, h in second)
    text = f"each job renders {sizes(first)}"
    if second:
        text += f", then a hires pass at {sizes(second)}"
    return f"{text}; {mp(total / len(jobs))} per job on average, {mp(total)} in all"


def plan(recipe: Recipe) -> list[Job]:
    """Every job of the recipe, in plan order."""
    return list(iter_jobs(recipe))
