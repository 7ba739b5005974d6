"""YAML recipe -> validated `Recipe`.

Every problem is reported as one line `path:line:col: message`, all problems of a file at
once, with the key named and the value shown. Unknown keys at any depth are errors that
suggest the nearest valid key. Nothing is silently corrected. No torch here.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from imagegen import prompts as P
from imagegen import recipe_inputs, recipe_prompts
from imagegen.defaults import (
    BUILTIN_PREFIX, DEFAULT_FORMAT, FORMATS, HIRES_UPSCALERS, MAX_HIRES_SCALE, MAX_JOBS_LIMIT, MAX_RECIPE_BYTES, MAX_RENDER_SIDE, MAX_SEED, MAX_UPSCALE_SIDE,
    MAX_YAML_DEPTH, MAX_YAML_VALUES, MIN_RENDER_SIDE, MIN_UPSCALE_SIDE,
)
from imagegen.errors import ModelError, RecipeError
from imagegen.fsutil import not_a_regular_file
from imagegen.modelfiles import check_lora, detect_model
from imagegen.models import BUILTIN_FAMILY, BUILTIN_FILES, BUILTIN_MODELS, FAMILY_CHOICES, FAMILY_NAMES, default_size
from imagegen.samplers import lookup_sampler, sampler_names

# --- defaults: one place, one comment each --------------------------------------------------
DEFAULTS: dict[str, Any] = {
    "family": "auto",  # detect SD1.5 / SDXL from the checkpoint's keys
    "negative": "",  # no negative prompt
    "seeds": 1,  # one seed: 0
    "size": None,  # by family: 512x512 SD1.5, 1024x1024 SDXL, 64x64 tiny built-ins, 32x32 demo-sd15 (needs a known family)
    "steps": 25,  # sampling steps
    "guidance": 7.0,  # CFG scale
    "scheduler": "DPM++ 2M Karras",  # the most common A1111 sampler
    "clip_skip": 1,  # A1111 convention: 1 = use the last CLIP layer
    "batch_size": 4,  # images per forward pass; never changes pixels, only speed
    "max_jobs": 5000,  # safety cap on the number of jobs one recipe may expand to
    "sample_seed": 0,  # seed for `sample:` prompt-variant draws
    "upscale_format": DEFAULT_FORMAT,  # tiled BigTIFF: no size limit, streams by tile
    "hires_scale": 2.0,  # A1111's default "Upscale by" when `hires:` gives no scale, width or height
    "hires_upscaler": "latent",  # A1111's default hires upscaler (bilinear on the latents)
    "hires_denoise": 0.7,  # A1111's default hires denoising strength
    "hires_keep_first": False,  # the first pass's image is not written
    "render_compile": False,  # `render.compile`: eager PyTorch unless the recipe, the defaults file or --compile says so
}

SCHEMA: dict[str, Any] = {
    "name": None,
    "description": None,
    "model": {"checkpoint": None, "family": None, "vae": None},
    "loras": [{"path": None, "weight": None, "name": None}],
    "lora_sets": {"*": [{"path": None, "weight": None, "name": None}]},
    "prompt": None,
    "prompts": None,
    "negative": None,
    "wildcards": None,
    "sample": None,
    "sample_seed": None,
    "seeds": {"start": None, "count": None},
    "size": None,
    "steps": None,
    "guidance": None,
    "scheduler": None,
    "clip_skip": None,
    "batch_size": None,
    "output": None,
    "upscale": {"model": None, "scale": None, "width": None, "height": None, "format": None, "tile": None},
    "hires": {"scale": None, "width": None, "height": None, "upscaler": None, "denoise": None, "steps": None,
              "scheduler": None, "keep_first": None},
    "max_jobs": None,
    "render": {"compile": None},
    **{k: None for k in recipe_prompts.SCHEMA_KEYS},  # prompt_syntax, emphasis, embeddings, lora_dir
    **{k: None for k in recipe_inputs.SCHEMA_KEYS},  # init_image, denoise, mask, mask_blur, keep_unmasked
    "controlnet": recipe_inputs.CONTROLNET_SCHEMA,
}


# Axis keys as they appear in `Job.axes`, plans and contact-sheet legends.
AXIS_LORA_SET = "lora_set"
AXIS_LORA_PREFIX = "lora:"

# --- the validated recipe -------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file; `weights` has more than one value when it is a sweep axis."""

    path: str
    name: str
    weights: tuple[float, ...]


@dataclass(frozen=True)
class LoraSet:
    """A named alternative stack of LoRAs (a `lora_sets` entry), each with one weight."""

    name: str
    loras: tuple[tuple[str, str, float], ...]  # (path, name, weight)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA applied to a job, with its weight."""

    path: str
    name: str
    weight: float


@dataclass(frozen=True)
class PromptVariant:
    """One concrete prompt: which template it came from and its position in the expansion."""

    template: int  # 0-based template number
    variant: int  # 0-based variant number within the template
    text: str  # what the encoder reads: `<lora:...>` tags removed
    loras: tuple[tuple[str, str, float], ...] = ()  # (path, name, weight) from the prompt's `<lora:...>` tags
    embeddings: tuple[str, ...] = ()  # embedding files the prompt or the negative uses


@dataclass(frozen=True)
class UpscaleSettings:
    model: str | None = None
    scale: float | None = None
    width: int | None = None
    height: int | None = None
    format: str = DEFAULTS["upscale_format"]
    tile: int | None = None


@dataclass(frozen=True)
class RenderSettings:
    """The `render:` section (of a recipe or of the defaults file): how a render runs, never
    what it makes. None = not set here (the next source decides)."""

    compile: bool | None = None


@dataclass(frozen=True)
class HiresSpec:
    """The recipe's `hires:` section. `targets` and `denoise` are sweep axes; `targets` holds
    ("scale", 1.5), ("width", 1536) or ("height", 1536) values, as written."""

    targets: tuple[tuple[str, float | int], ...]
    upscaler: str  # a HIRES_UPSCALERS name or an absolute weight-file path
    denoise: tuple[float, ...]
    steps: int | None  # None: the first pass's steps
    scheduler: str | None  # None: the first pass's scheduler
    keep_first: bool = False


def hires_size(width: int, height: int, target: tuple[str, float | int]) -> tuple[int, int]:
    """The second pass's size for a first pass of `width`x`height` and a hires target.

    As A1111: `scale` multiplies both sides (`int(side * scale)`), `width` or `height` sets one
    side and the other follows the aspect ratio (`other * given // side`). Derived sides are
    then rounded down to a multiple of 8, as A1111's latent upscale does."""
    kind, value = target
    if kind == "scale":
        w, h = int(width * value), int(height * value)
    elif kind == "width":
        w, h = int(value), int(value) * height // width
    else:
        w, h = int(value) * width // height, int(value)
    return w // 8 * 8, h // 8 * 8


def hires_label(target: tuple[str, float | int]) -> str:
    """How a hires target is shown in plans and sheets: `x1.5`, `w1536`, `h1536`."""
    kind, value = target
    return {"scale": "x", "width": "w", "height": "h"}[kind] + f"{value:g}"


@dataclass(frozen=True)
class Recipe:
    """A recipe that passed validation. Paths are absolute (relative ones resolve against
    the recipe's folder), and sweep axes are tuples with at least one value."""

    path: Path
    sha256: str
    name: str
    checkpoint: str  # absolute path, "builtin:<name>" or (with --allow-download) a hub id
    family: str
    vae: str | None
    loras: tuple[LoraSpec, ...]
    lora_sets: tuple[LoraSet, ...]  # empty: no named sets
    templates: tuple[str, ...]
    prompts: tuple[PromptVariant, ...]
    negative: str
    seeds: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]
    steps: tuple[int, ...]
    guidance: tuple[float, ...]
    schedulers: tuple[str, ...]
    clip_skip: int
    batch_size: int
    output: Path
    upscale: UpscaleSettings
    max_jobs: int
    hires: HiresSpec | None = None
    text: str = field(repr=False, default="")
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # advice `validate` and `plan` print (not problems)
    prompt_syntax: str = "a1111"  # a1111 | plain (see prompt_syntax.py)
    emphasis: str = "original"  # original | no-norm | ignore
    embeddings: tuple[str, ...] = ()  # textual-inversion files on offer (absolute paths)
    lora_dir: str | None = None  # where `<lora:name:w>` tags find `name.safetensors`
    inputs: recipe_inputs.InputsSpec = recipe_inputs.InputsSpec()  # init_image, mask, controlnet (recipe_inputs.py)
    inpainting: bool = False  # the checkpoint is an inpainting model (9-channel UNet): img2img/inpaint jobs only
    render: RenderSettings = field(default_factory=lambda: RenderSettings())  # how to render, not what: never in a job's id


# --- YAML with positions --------------------------------------------------------------------

Path_ = tuple  # a key path such as ("loras", 0, "weight")


class _Doc:
    """Plain Python data from YAML plus the (line, col) of every key path, 1-based."""

    def __init__(self, file: str, check_files: bool = True) -> None:
        self.file = file
        self.check_files = check_files
        self.missing: list[str] = []  # missing-file problems when files are not checked
        self.notes: list[str] = []  # advice that is not a problem (e.g. a prompt of many chunks)
        self.lora_files: list[tuple[Path_, str]] = []  # (key path, file) of every LoRA, for family checks
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.key_marks: dict[Path_, tuple[int, int]] = {}
        self.problems: list[str] = []
        self.values = 0  # values built so far, aliases followed: an alias bomb stops at MAX_YAML_VALUES

    def at(self, path: Path_, *, key: bool = False) -> str:
        """`file:line:col` of a value (or of its key, when `key`)."""
        table = self.key_marks if key and path in self.key_marks else self.marks
        p = path
        while p and p not in table:
            p = p[:-1]
        line, col = table.get(p, self.marks.get((), (1, 1)))
        return f"{self.file}:{line}:{col}"

    def problem(self, path: Path_, message: str, *, key: bool = False) -> None:
        self.problems.append(f"{self.at(path, key=key)}: {message}")

    def missing_file(self, path: Path_, message: str) -> None:
        """A referenced file does not exist: a problem, or a warning when files are not checked."""
        line = f"{self.at(path)}: {message}"
        (self.problems if self.check_files else self.missing).append(line)

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            raise _TooManyValues(node)
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for k_node, v_node in node.value:
                if k_node.tag == "tag:yaml.org,2002:merge":
                    self.problems.append(f"{self.file}:{k_node.start_mark.line + 1}:{k_node.start_mark.column + 1}: YAML merge keys (`<<`) are not supported")
                    continue
                key = _scalar(k_node) if isinstance(k_node, yaml.ScalarNode) else None
                where = f"{self.file}:{k_node.start_mark.line + 1}:{k_node.start_mark.column + 1}"
                if not isinstance(key, str):
                    self.problems.append(f"{where}: keys must be text, got {_show(key)}")
                    continue
                if key in out:
                    self.problems.append(f"{where}: `{_dotted(path + (key,))}` is given twice")
                    continue
                self.key_marks[path + (key,)] = (k_node.start_mark.line + 1, k_node.start_mark.column + 1)
                out[key] = self.build(v_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, path + (i,)) for i, v in enumerate(node.value)]
        return _scalar(node)


class _TooManyValues(Exception):
    """Building the recipe passed MAX_YAML_VALUES values (an alias bomb, a giant list)."""

    def __init__(self, node: yaml.Node) -> None:
        self.node = node


_CONSTRUCTOR = yaml.constructor.SafeConstructor()
# libyaml's parser when PyYAML has it (much faster on large recipes, same nodes and marks);
# a syntax error is parsed again in pure Python for PyYAML's own wording and hints.
_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NESTING_START = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_NESTING_END = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _too_deep(text: str, loader: type) -> yaml.Mark | None:
    """Where the YAML first nests more than MAX_YAML_DEPTH deep, from the parser's flat
    event stream (no recursion, so 200k `[` cannot overflow a stack); None when it does not."""
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, _NESTING_START):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return event.start_mark
        elif isinstance(event, _NESTING_END):
            depth -= 1
    return None


def _scalar(node: yaml.Node) -> Any:
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError:
        return node.value


def _dotted(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 60 else text[:57] + "..."


# --- checkers --------------------------------------------------------------------------------


def _home_of(key: Any) -> str | None:
    """The top-level section whose mapping has `key` (`checkpoint` -> `model`), for a key written
    at the top level by mistake; None when no section has it."""
    for section, sub in SCHEMA.items():
        if isinstance(sub, dict) and key in sub and key != "*":
            return section
    return None


def _check_keys(doc: _Doc, data: Any, schema: Any, path: Path_) -> None:
    """Unknown keys at any depth, with the nearest valid key suggested."""
    if isinstance(schema, dict) and isinstance(data, dict):
        allowed = [k for k in schema if k != "*"]
        for key, value in data.items():
            if key in schema:
                _check_keys(doc, value, schema[key], path + (key,))
            elif "*" in schema:
                _check_keys(doc, value, schema["*"], path + (key,))
            else:
                near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
                home = _home_of(key) if not path else None
                if home:
                    hint = f"; it belongs under `{home}:` (indent it there)"
                elif near:
                    hint = f"; did you mean `{near[0]}`?"
                else:
                    hint = f"; valid keys here: {', '.join(allowed)}"
                doc.problem(path + (key,), f"unknown key `{_dotted(path + (key,))}`{hint}", key=True)
    elif isinstance(schema, list) and isinstance(data, list):
        for i, item in enumerate(data):
            _check_keys(doc, item, schema[0], path + (i,))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis(doc: _Doc, data: dict, key: str, check: Callable[[Any, Path_], Any], default: Any) -> tuple:
    """A value or a list of values (a sweep axis); `check` returns the clean value or None."""
    if key not in data:
        return (default,)
    raw = data[key]
    items = raw if isinstance(raw, list) and not _looks_like_size_pair(key, raw) else [raw]
    paths = [(key, i) for i in range(len(items))] if items is raw else [(key,)]
    if not items:
        doc.problem((key,), f"`{key}` is an empty list; give at least one value")
        return ()
    out = []
    for value, p in zip(items, paths):
        clean = check(value, p)
        if clean is not None:
            out.append(clean)
    seen = set()
    for value, p in zip(out, paths):
        if value in seen:
            doc.problem(p, f"`{key}` lists {_show(value)} twice")
        seen.add(value)
    return tuple(out)


def _looks_like_size_pair(key: str, raw: list) -> bool:
    return key == "size" and len(raw) == 2 and all(_is_int(v) for v in raw)


def _size(doc: _Doc):
    def check(value: Any, path: Path_):
        if isinstance(value, str):
            m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
            if not m:
                doc.problem(path, f"`size` must look like \"1024x768\" or [1024, 768], got {_show(value)}")
                return None
            w, h = int(m.group(1)), int(m.group(2))
        elif isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value):
            w, h = value
        else:
            doc.problem(path, f"`size` must look like \"1024x768\" or [1024, 768], got {_show(value)}")
            return None
        bad = [f"{n} {v}" for n, v in (("width", w), ("height", h)) if v % 8 or not MIN_RENDER_SIDE <= v <= MAX_RENDER_SIDE]
        if bad:
            doc.problem(path, f"`size` {w}x{h}: {', '.join(bad)} must be a multiple of 8 between {MIN_RENDER_SIDE} and {MAX_RENDER_SIDE}")
            return None
        return (w, h)

    return check


def _int_in(doc: _Doc, key: str, lo: int, hi: int | None = None):
    def check(value: Any, path: Path_):
        if not _is_int(value) or value < lo or (hi is not None and value > hi):
            rng = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            doc.problem(path, f"`{key}` must be a whole number {rng}, got {_show(value)}")
            return None
        return value

    return check


def _num_in(doc: _Doc, key: str, lo: float, hi: float):
    def check(value: Any, path: Path_):
        if not _is_num(value) or not lo <= value <= hi:
            comma = isinstance(value, str) and re.fullmatch(r"\s*-?\d+,\d+\s*", value)
            hint = f" (did you mean {value.strip().replace(',', '.')}? decimals take a point)" if comma else ""
            doc.problem(path, f"`{key}` must be a number from {lo:g} to {hi:g}, got {_show(value)}{hint}")
            return None
        return float(value)

    return check


def _scheduler(doc: _Doc):
    def check(value: Any, path: Path_):
        spec = lookup_sampler(value) if isinstance(value, str) else None
        if spec is None:
            near = difflib.get_close_matches(str(value), sampler_names(), n=1, cutoff=0.6)
            hint = f"did you mean \"{near[0]}\"? " if near else ""
            doc.problem(path, f"unknown `scheduler` {_show(value)}; {hint}valid: {', '.join(sampler_names())}")
            return None
        return spec.name

    return check


def _text(doc: _Doc, data: dict, key: str, *, required: bool = False, default: str | None = None) -> str | None:
    if key not in data:
        if required:
            doc.problem((), f"missing required key `{key}`")
        return default
    value = data[key]
    if not isinstance(value, str) or (required and not value.strip()):
        doc.problem((key,), f"`{key}` must be text, got {_show(value)}")
        return default
    return value


def _seeds(doc: _Doc, data: dict, cap: int | None) -> tuple[int, ...]:
    """The recipe's seeds; more than `cap` (the job cap) is an error before any list is built.
    `cap` None: `max_jobs` itself is wrong (already reported), so only MAX_JOBS_LIMIT applies, silently."""
    quiet = cap is None
    cap = MAX_JOBS_LIMIT if cap is None else cap
    raw = data.get("seeds", DEFAULTS["seeds"])
    path: Path_ = ("seeds",)
    bad = f"`seeds` must be a count, a list of seeds, {{start: N, count: M}} or a range \"1000-1099\", got {_show(raw)}"
    seeds: range | None = None
    if _is_int(raw):
        if raw < 1:
            doc.problem(path, f"`seeds` count must be at least 1, got {raw}")
            return ()
        seeds = range(raw)
    elif isinstance(raw, str):
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", raw)
        if not m:
            doc.problem(path, bad)
            return ()
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            doc.problem(path, f"`seeds` range \"{raw}\" ends before it starts")
            return ()
        seeds = range(lo, hi + 1)
    elif isinstance(raw, dict):
        start, count = raw.get("start", 0), raw.get("count")
        if not _is_int(start) or start < 0:
            doc.problem(path + ("start",), f"`seeds.start` must be a whole number >= 0, got {_show(start)}")
            return ()
        if not _is_int(count) or count < 1:
            doc.problem(path + ("count",) if "count" in raw else path, f"`seeds.count` must be a whole number >= 1, got {_show(count)}")
            return ()
        seeds = range(start, start + count)
    elif isinstance(raw, list):
        if not raw:
            doc.problem(path, "`seeds` is an empty list; give at least one seed")
            return ()
        if len(raw) > cap:
            if not quiet:
                doc.problem(path, f"`seeds` lists {len(raw)} seeds, more than `max_jobs: {cap}` allows on its own")
            return ()
        out: list[int] = []
        seen: set[int] = set()
        for i, s in enumerate(raw):
            if not _is_int(s) or not 0 <= s <= MAX_SEED:
                doc.problem(path + (i,), f"seed must be a whole number from 0 to {MAX_SEED}, got {_show(s)}")
            elif s in seen:
                doc.problem(path + (i,), f"seed {s} is listed twice")
            else:
                seen.add(s)
                out.append(s)
        return tuple(out)
    else:
        doc.problem(path, bad)
        return ()
    if seeds[-1] > MAX_SEED:
        doc.problem(path, f"seeds must be at most {MAX_SEED}, the range reaches {seeds[-1]}")
        return ()
    if len(seeds) > cap:
        if quiet:
            return ()
        doc.problem(path, f"`seeds` gives {len(seeds)} seeds, more than `max_jobs: {cap}` allows on its own")
        return ()
    return tuple(seeds)


def _is_path_text(value: Any) -> bool:
    """Non-empty text that can name a file (no NUL bytes)."""
    return isinstance(value, str) and bool(value.strip()) and "\x00" not in value


def _resolve(base: Path, value: str) -> Path:
    if value.startswith(BUILTIN_PREFIX) and value[len(BUILTIN_PREFIX):] in BUILTIN_FILES:
        return BUILTIN_FILES[value[len(BUILTIN_PREFIX):]]
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def _model(doc: _Doc, data: dict, base: Path, allow_download: bool) -> tuple[str, str, str | None, bool]:
    """(checkpoint, family, VAE, inpainting model)."""
    raw = data.get("model")
    if raw is None:
        doc.problem((), "missing required key `model` (with `checkpoint:`)")
        return "", "auto", None, False
    if not isinstance(raw, dict):
        doc.problem(("model",), f"`model` must be a mapping with `checkpoint:` (and optional `family:`, `vae:`), got {_show(raw)}")
        return "", "auto", None, False
    inpainting = False
    family = raw.get("family", DEFAULTS["family"])
    if family not in FAMILY_CHOICES:
        doc.problem(("model", "family"), f"`model.family` must be one of {', '.join(FAMILY_CHOICES)}, got {_show(family)}")
        family = "auto"
    ckpt = raw.get("checkpoint")
    checkpoint = ""
    if not _is_path_text(ckpt):
        doc.problem(("model", "checkpoint") if "checkpoint" in raw else ("model",), f"`model.checkpoint` must be a file, a diffusers folder or builtin:NAME, got {_show(ckpt)}")
    elif ckpt.startswith(BUILTIN_PREFIX):
        name = ckpt[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            doc.problem(("model", "checkpoint"), f"unknown built-in model `{ckpt}`; built-ins: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
        else:
            checkpoint = ckpt
            real = BUILTIN_FAMILY[name]
            if family not in ("auto", real):
                doc.problem(("model", "family"), f"`model.family` is {family} but `{ckpt}` is {real}")
            family = real
    else:
        path = _resolve(base, ckpt)
        special = not_a_regular_file(path, folder_ok=True)
        if special:
            doc.problem(("model", "checkpoint"), f"checkpoint `{path}` {special}")
            checkpoint = str(path)
        elif path.exists():
            if path.is_dir() and not (path / "model_index.json").exists():
                doc.problem(("model", "checkpoint"), f"checkpoint folder `{path}` has no model_index.json (not a diffusers folder)")
            elif path.is_file() and path.suffix.lower() not in (".safetensors",):
                doc.problem(("model", "checkpoint"), f"checkpoint `{path}`: only .safetensors single files are loaded (pickled .ckpt files can run code)")
            else:
                # Read the family from the file's keys (header only, no torch): SD2, SD3, Flux
                # and refiners are refused here, before any model loads; an inpainting model is
                # accepted for img2img / inpainting jobs (recipe_inputs refuses it without).
                try:
                    found, inpainting = detect_model(path)
                except ModelError as exc:
                    doc.problem(("model", "checkpoint"), exc.message)
                else:
                    if family not in ("auto", found):
                        doc.problem(("model", "family"), f"`model.family` is {family} but `{path.name}` is {found}")
                    family = found
            checkpoint = str(path.resolve())
        elif allow_download and _HUB_ID.fullmatch(ckpt):
            checkpoint = ckpt
        else:
            hint = " (a hub id needs --allow-download)" if _HUB_ID.fullmatch(ckpt) and not Path(ckpt).suffix else ""
            doc.missing_file(("model", "checkpoint"), f"checkpoint file not found: `{path}`{hint}")
            checkpoint = str(path.resolve())
    vae = raw.get("vae")
    vae_path = None
    if vae is not None:
        if not _is_path_text(vae):
            doc.problem(("model", "vae"), f"`model.vae` must be a file or folder path, got {_show(vae)}")
        else:
            p = _resolve(base, vae)
            special = not_a_regular_file(p, folder_ok=True)
            if special:
                doc.problem(("model", "vae"), f"VAE `{p}` {special}")
            elif not p.exists():
                doc.missing_file(("model", "vae"), f"VAE file not found: `{p}`")
            vae_path = str(p.resolve())
    return checkpoint, family, vae_path, inpainting


def _input_counts(inputs: recipe_inputs.InputsSpec) -> list[tuple[str, int]]:
    """(label, number of values) of the input-photo axes, in plan order."""
    counts = []
    if inputs.photos:
        counts += [("input photos", len(inputs.photos)), ("denoise values", len(inputs.denoise))]
    counts += [(f"weights of ControlNet {i}", len(u.weights)) for i, u in enumerate(inputs.controlnet)]
    return counts


def _lora_entry(doc: _Doc, item: Any, path: Path_, base: Path, *, sweep: bool) -> tuple[str, str, tuple[float, ...]] | None:
    if not isinstance(item, dict) or "path" not in item:
        doc.problem(path, f"a LoRA entry must be a mapping with `path:` and `weight:`, got {_show(item)}")
        return None
    ok = True
    raw_path = item["path"]
    lora_path = ""
    if not _is_path_text(raw_path):
        doc.problem(path + ("path",), f"LoRA `path` must be a file path, got {_show(raw_path)}")
        ok = False
    else:
        p = _resolve(base, raw_path)
        special = not_a_regular_file(p)
        if special:
            doc.problem(path + ("path",), f"LoRA `{p}` {special}")
            ok = False
        elif not p.is_file():
            doc.missing_file(path + ("path",), f"LoRA file not found: `{p}`")
            ok = ok and not doc.check_files
        if p.suffix.lower() != ".safetensors":
            doc.problem(path + ("path",), f"LoRA `{p}`: only .safetensors files are loaded")
            ok = False
        lora_path = str(p.resolve())
        if ok and p.is_file():
            doc.lora_files.append((path + ("path",), lora_path))
    name = item.get("name", Path(lora_path or raw_path).stem if isinstance(raw_path, str) else "")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w\-]*", name or ""):
        doc.problem(path + ("name",) if "name" in item else path + ("path",), f"LoRA name {_show(name)} must be letters, digits, `_` or `-` (set `name:` to override the file name)")
        ok = False
    raw_w = item.get("weight", 1.0)
    weights_raw = raw_w if isinstance(raw_w, list) else [raw_w]
    if isinstance(raw_w, list) and not sweep:
        doc.problem(path + ("weight",), "a weight list is a sweep; it is allowed in `loras`, not inside `lora_sets` (make several sets instead)")
        return None
    if not weights_raw:
        doc.problem(path + ("weight",), "LoRA `weight` is an empty list; give at least one weight")
        return None
    weights = []
    for i, w in enumerate(weights_raw):
        wp = path + ("weight", i) if isinstance(raw_w, list) else path + ("weight",)
        if not _is_num(w) or not -10 <= w <= 10:
            doc.problem(wp, f"LoRA `weight` must be a number from -10 to 10, got {_show(w)}")
            ok = False
        elif float(w) in weights:
            doc.problem(wp, f"LoRA weight {w} is listed twice")
            ok = False
        else:
            weights.append(float(w))
    return (lora_path, name, tuple(weights)) if ok else None


def _loras(doc: _Doc, data: dict, base: Path) -> tuple[tuple[LoraSpec, ...], tuple[LoraSet, ...]]:
    specs: list[LoraSpec] = []
    raw = data.get("loras", [])
    if not isinstance(raw, list):
        doc.problem(("loras",), f"`loras` must be a list of {{path, weight}} entries, got {_show(raw)}")
        raw = []
    for i, item in enumerate(raw):
        entry = _lora_entry(doc, item, ("loras", i), base, sweep=True)
        if entry:
            specs.append(LoraSpec(entry[0], entry[1], entry[2]))
    names = [s.name for s in specs]
    for i, n in enumerate(names):
        if n in names[:i]:
            doc.problem(("loras", i), f"two LoRAs are named `{n}`; set `name:` on one of them")
    sets: list[LoraSet] = []
    raw_sets = data.get("lora_sets", {})
    if not isinstance(raw_sets, dict):
        doc.problem(("lora_sets",), f"`lora_sets` must map set names to lists of {{path, weight}}, got {_show(raw_sets)}")
        raw_sets = {}
    for set_name, items in raw_sets.items():
        sp: Path_ = ("lora_sets", set_name)
        if not re.fullmatch(r"[A-Za-z0-9][\w\-]*", set_name):
            doc.problem(sp, f"LoRA set name `{set_name}` must be letters, digits, `_` or `-`", key=True)
        if items is None:
            items = []  # `plain:` with nothing = the set without LoRAs
        if not isinstance(items, list):
            doc.problem(sp, f"LoRA set `{set_name}` must be a list of {{path, weight}} (or empty), got {_show(items)}")
            continue
        entries = []
        for i, item in enumerate(items):
            entry = _lora_entry(doc, item, sp + (i,), base, sweep=False)
            if entry:
                entries.append((entry[0], entry[1], entry[2][0]))
        sets.append(LoraSet(set_name, tuple(entries)))
    if "lora_sets" in data and not raw_sets:
        doc.problem(("lora_sets",), "`lora_sets` is empty; remove it or name at least one set")
    return tuple(specs), tuple(sets)


def _prompt_variants(doc: _Doc, data: dict, base: Path,
                     budget: Callable[[int], str | None] | None = None) -> tuple[tuple[str, ...], tuple[PromptVariant, ...], Path | None]:
    """Templates and their variants. Each template is parsed and counted first; when `budget`
    (the job-count check, given the number of variants) objects, no variant is built."""
    has_one, has_many = "prompt" in data, "prompts" in data
    if has_one and has_many:
        doc.problem(("prompts",), "give either `prompt` or `prompts`, not both", key=True)
        return (), (), None
    if not has_one and not has_many:
        doc.problem((), "missing required key `prompt` (or `prompts`: a list of templates)")
        return (), (), None
    key = "prompt" if has_one else "prompts"
    raw = data[key]
    if has_one:
        items, paths = [raw], [("prompt",)]
    elif isinstance(raw, list):
        items, paths = raw, [("prompts", i) for i in range(len(raw))]
        if not raw:
            doc.problem(("prompts",), "`prompts` is an empty list; give at least one template")
    else:
        doc.problem(("prompts",), f"`prompts` must be a list of templates, got {_show(raw)}")
        return (), (), None
    wild_dir: Path | None = None
    if "wildcards" in data:
        w = data["wildcards"]
        if not _is_path_text(w):
            doc.problem(("wildcards",), f"`wildcards` must be a folder path, got {_show(w)}")
        else:
            wild_dir = _resolve(base, w)
            if not wild_dir.is_dir():
                doc.problem(("wildcards",), f"wildcards folder not found: `{wild_dir}`")  # variants need it
                wild_dir = None
    loader = P.folder_wildcards(wild_dir) if wild_dir else None
    sample = data.get("sample")
    if sample is not None and (not _is_int(sample) or sample < 1):
        doc.problem(("sample",), f"`sample` must be a whole number >= 1, got {_show(sample)}")
        sample = None
    sample_seed = data.get("sample_seed", DEFAULTS["sample_seed"])
    if not _is_int(sample_seed) or sample_seed < 0:
        doc.problem(("sample_seed",), f"`sample_seed` must be a whole number >= 0, got {_show(sample_seed)}")
        sample_seed = 0
    if "sample_seed" in data and sample is None and "sample" not in data:
        doc.problem(("sample_seed",), "`sample_seed` has no effect without `sample`", key=True)
    templates: list[str] = []
    parsed: list[tuple[int, str, Path_, int]] = []  # (template number, text, key path, variants)
    for t, (tmpl, path) in enumerate(zip(items, paths)):
        if not isinstance(tmpl, str) or not tmpl.strip():
            doc.problem(path, f"a prompt template must be non-empty text, got {_show(tmpl)}")
            continue
        templates.append(tmpl)
        try:
            n = P.count_variants(tmpl, loader)
        except P.PromptSyntaxError as exc:
            doc.problem(path, f"`{_dotted(path)}`: {exc.message}: {_show(tmpl)}")
            continue
        if not sample and n > P.MAX_ENUMERATE:
            doc.problem(path, f"`{_dotted(path)}`: expands to {n} variants (more than {P.MAX_ENUMERATE}); use `sample`: {_show(tmpl)}")
            continue
        parsed.append((t, tmpl, path, n))
    total = sum(min(n, sample) if sample else n for *_, n in parsed)
    over = budget(total) if budget else None
    if over:
        doc.problem(("max_jobs",) if "max_jobs" in data else (), over)
        return tuple(templates), (), wild_dir
    variants: list[PromptVariant] = []
    seen: dict[str, int] = {}
    for t, tmpl, path, _ in parsed:
        try:
            texts = P.sample_variants(tmpl, sample, sample_seed, loader) if sample else P.expand(tmpl, loader)
        except P.PromptSyntaxError as exc:
            doc.problem(path, f"`{_dotted(path)}`: {exc.message}: {_show(tmpl)}")
            continue
        for v, text in enumerate(texts):
            text = " ".join(text.split())
            if text in seen:
                doc.problem(path, f"prompt variant {_show(text)} appears twice (template {seen[text] + 1} and {t + 1}); duplicate jobs would collide")
                break
            seen[text] = t
            variants.append(PromptVariant(t, v, text))
    return tuple(templates), tuple(variants), wild_dir


def _upscale(doc: _Doc, data: dict, base: Path) -> UpscaleSettings:
    raw = data.get("upscale")
    if raw is None:
        return UpscaleSettings()
    if not isinstance(raw, dict):
        doc.problem(("upscale",), f"`upscale` must be a mapping (model, scale|width|height, format, tile), got {_show(raw)}")
        return UpscaleSettings()
    p: Path_ = ("upscale",)
    model = None
    if "model" in raw:
        m = raw["model"]
        if not _is_path_text(m):
            doc.problem(p + ("model",), f"`upscale.model` must be a weight file path, got {_show(m)}")
        else:
            mp = _resolve(base, m)
            special = not_a_regular_file(mp)
            if special:
                doc.problem(p + ("model",), f"upscale model `{mp}` {special}")
            elif not mp.is_file():
                doc.missing_file(p + ("model",), f"upscale model file not found: `{mp}`")
            model = str(mp.resolve())
    targets = [k for k in ("scale", "width", "height") if k in raw]
    if len(targets) > 1:
        doc.problem(p + (targets[1],), f"give one of `upscale.scale`, `upscale.width`, `upscale.height`, not {' and '.join(targets)}", key=True)
    scale = raw.get("scale")
    if scale is not None and (not _is_num(scale) or not 1 <= scale <= 64):
        doc.problem(p + ("scale",), f"`upscale.scale` must be a number from 1 to 64, got {_show(scale)}")
        scale = None
    sides = {}
    for k in ("width", "height"):
        v = raw.get(k)
        if v is not None and (not _is_int(v) or not MIN_UPSCALE_SIDE <= v <= MAX_UPSCALE_SIDE):
            doc.problem(p + (k,), f"`upscale.{k}` must be a whole number of pixels from {MIN_UPSCALE_SIDE} to {MAX_UPSCALE_SIDE}, got {_show(v)}")
            v = None
        sides[k] = v
    fmt = raw.get("format", DEFAULTS["upscale_format"])
    if fmt not in FORMATS:
        doc.problem(p + ("format",), f"`upscale.format` must be one of {', '.join(FORMATS)}, got {_show(fmt)}")
        fmt = DEFAULTS["upscale_format"]
    tile = raw.get("tile")
    if tile is not None and (not _is_int(tile) or not 32 <= tile <= 4096):
        doc.problem(p + ("tile",), f"`upscale.tile` must be a whole number from 32 to 4096, got {_show(tile)}")
        tile = None
    return UpscaleSettings(model, float(scale) if scale is not None else None, sides["width"], sides["height"], fmt, tile)


def _render_section(doc: _Doc, data: dict) -> RenderSettings:
    """The `render:` section: `compile` (true/false)."""
    raw = data.get("render")
    if raw is None:
        return RenderSettings()
    if not isinstance(raw, dict):
        doc.problem(("render",), f"`render` must be a mapping (compile: true|false), got {_show(raw)}")
        return RenderSettings()
    value = raw.get("compile")
    if value is not None and not isinstance(value, bool):
        doc.problem(("render", "compile"), f"`render.compile` must be true or false, got {_show(value)}")
        value = None
    return RenderSettings(compile=value)


DEFAULTS_FILE_SCHEMA: dict[str, Any] = {"render": SCHEMA["render"]}


def load_defaults_file(path: str | Path | None = None) -> RenderSettings:
    """The `render:` settings of the defaults file (`defaults.defaults_file()` unless `path`);
    all unset when there is no such file. Raises RecipeError (`path:line:col: message`) for a
    file that is not valid YAML, not a mapping, or holds an unknown key or a bad value."""
    from imagegen.defaults import defaults_file

    path = Path(path) if path is not None else defaults_file()
    shown = str(path)
    try:
        if not path.exists():
            return RenderSettings()
        if not path.is_file():
            raise RecipeError([f"{shown}: the defaults file is not a regular file"])
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise RecipeError([f"{shown}: cannot read the defaults file: {exc.strerror}"]) from None
    doc = _Doc(shown)
    try:
        node = _compose(text, shown)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        raise RecipeError([f"{where}: YAML syntax error: {' '.join(str(x) for x in (exc.context, exc.problem) if x)}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{shown}: YAML error: {' '.join(str(exc).split())}"]) from None
    if node is None:
        return RenderSettings()
    try:
        data = doc.build(node)
    except _TooManyValues:
        raise RecipeError([f"{shown}: the defaults file holds more than {MAX_YAML_VALUES} values"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{shown}:1:1: the defaults file must be a mapping (render: {{compile: true}}), "
                           f"got {type(data).__name__}"])
    _check_keys(doc, data, DEFAULTS_FILE_SCHEMA, ())
    settings = _render_section(doc, data)
    if doc.problems:
        raise RecipeError(doc.problems)
    return settings


def _hires(doc: _Doc, data: dict, base: Path, sizes: tuple, steps: tuple) -> HiresSpec | None:
    """The `hires:` section: a second, img2img pass at a larger size (A1111's Hires. fix)."""
    if "hires" not in data:
        return None
    raw = data["hires"]
    p: Path_ = ("hires",)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        doc.problem(p, f"`hires` must be a mapping (scale|width|height, upscaler, denoise, steps, scheduler, keep_first), got {_show(raw)}")
        return None
    given = [k for k in ("scale", "width", "height") if k in raw]
    if len(given) > 1:
        doc.problem(p + (given[1],), f"give one of `hires.scale`, `hires.width`, `hires.height`, not {' and '.join(given)}", key=True)
        return None
    kind = given[0] if given else "scale"
    section = _Sub(doc, p)
    target_data = {kind: raw.get(kind, DEFAULTS["hires_scale"])}
    if kind == "scale":
        check = _num_in(section, "hires.scale", 1.0, MAX_HIRES_SCALE)  # type: ignore[arg-type]
    else:
        def check(value: Any, path: Path_):
            if not _is_int(value) or value % 8 or not MIN_RENDER_SIDE <= value <= MAX_RENDER_SIDE:
                section.problem(path, f"`hires.{kind}` must be a multiple of 8 from {MIN_RENDER_SIDE} to {MAX_RENDER_SIDE}, got {_show(value)}")
                return None
            return value
    values = _axis(section, target_data, kind, check, None)  # type: ignore[arg-type]
    targets = tuple((kind, v) for v in values)
    for target in targets:
        for w, h in sizes:
            hw, hh = hires_size(w, h, target)
            if not (MIN_RENDER_SIDE <= hw <= MAX_RENDER_SIDE and MIN_RENDER_SIDE <= hh <= MAX_RENDER_SIDE):
                doc.problem(p + (kind,), f"`hires.{kind}: {target[1]:g}` makes {w}x{h} into {hw}x{hh}; each side must be "
                                         f"from {MIN_RENDER_SIDE} to {MAX_RENDER_SIDE}")
    denoise = _axis(section, raw, "denoise", _denoise(section), DEFAULTS["hires_denoise"])  # type: ignore[arg-type]
    hsteps = raw.get("steps")
    if hsteps is not None and (not _is_int(hsteps) or not 1 <= hsteps <= 500):
        doc.problem(p + ("steps",), f"`hires.steps` must be a whole number from 1 to 500, got {_show(hsteps)}")
        hsteps = None
    for d in denoise:
        for n in (hsteps,) if hsteps is not None else steps:
            if int(n / d) > 10_000:
                doc.problem(p + ("denoise",), f"`hires.denoise: {d:g}` with {n} steps means a schedule of {int(n / d)} "
                                              "steps (steps / denoise); raise `denoise` or lower `hires.steps`")
    scheduler = None
    if "scheduler" in raw:
        scheduler = _scheduler(doc)(raw["scheduler"], p + ("scheduler",))
    keep_first = raw.get("keep_first", DEFAULTS["hires_keep_first"])
    if not isinstance(keep_first, bool):
        doc.problem(p + ("keep_first",), f"`hires.keep_first` must be true or false, got {_show(keep_first)}")
        keep_first = False
    upscaler = _hires_upscaler(doc, raw.get("upscaler", DEFAULTS["hires_upscaler"]), p + ("upscaler",), base)
    return HiresSpec(targets, upscaler, denoise, hsteps, scheduler, keep_first)


class _Sub:
    """A `_Doc` view whose paths start under a section (for `_axis` inside `hires:`)."""

    def __init__(self, doc: _Doc, prefix: Path_) -> None:
        self.doc, self.prefix = doc, prefix

    def problem(self, path: Path_, message: str, *, key: bool = False) -> None:
        """`_axis` names the bare key (`denoise`); the message names it in full (`hires.denoise`)."""
        if message.startswith("`") and not message.startswith("`hires."):
            message = "`hires." + message[1:]
        self.doc.problem(self.prefix + path, message, key=key)


def _denoise(section: _Sub):
    def check(value: Any, path: Path_):
        if not _is_num(value) or not 0 < value <= 1:
            section.problem(path, f"`hires.denoise` must be a number above 0 and at most 1, got {_show(value)}")
            return None
        return float(value)

    return check


def _hires_upscaler(doc: _Doc, value: Any, path: Path_, base: Path) -> str:
    """A built-in hires upscaler name, or a Real-ESRGAN weight file whose layout we understand."""
    if isinstance(value, str) and value in HIRES_UPSCALERS:
        return value
    names = ", ".join(HIRES_UPSCALERS)
    if not _is_path_text(value) or not (Path(value).suffix or value.startswith(BUILTIN_PREFIX)):
        doc.problem(path, f"`hires.upscaler` must be one of {names} or a Real-ESRGAN weight file (.pth, .safetensors), got {_show(value)}")
        return DEFAULTS["hires_upscaler"]
    file = _resolve(base, value)
    special = not_a_regular_file(file)
    if special:
        doc.problem(path, f"hires upscaler `{file}` {special}")
        return str(file)
    if not file.is_file():
        doc.missing_file(path, f"hires upscaler file not found: `{file}`")
        return str(file.resolve())
    from imagegen.upscale.detect import check_weight_file

    try:
        check_weight_file(file)
    except ModelError as exc:
        doc.problem(path, f"`hires.upscaler`: {exc.message}")
    return str(file.resolve())


# --- entry point ----------------------------------------------------------------------------


def load_recipe(path: str | Path, *, allow_download: bool = False, check_files: bool = True) -> Recipe:
    """Read and validate a recipe file.

    With `check_files=False`, missing checkpoint, VAE, LoRA and upscaler files become
    `Recipe.warnings` instead of errors (for planning before the files are in place).
    Raises RecipeError listing every problem as `path:line:col: message`."""
    path = Path(path)
    shown = str(path)
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never ends
            raise RecipeError([f"{shown}: not a regular file (a pipe, device or socket); give a recipe file"])
        if st.st_size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{shown}: the recipe is {st.st_size / 2**20:.1f} MB; recipes may be at most "
                               f"{MAX_RECIPE_BYTES >> 20} MB (use `seeds: {{start: N, count: M}}` or a wildcard file for long lists)"])
        with open(path, "rb") as f:
            raw_bytes = f.read(MAX_RECIPE_BYTES + 1)
    except FileNotFoundError:
        raise RecipeError([f"{shown}: recipe file not found"]) from None
    except IsADirectoryError:
        raise RecipeError([f"{shown}: is a folder, not a recipe file"]) from None
    except OSError as exc:
        raise RecipeError([f"{shown}: cannot read: {exc.strerror}"]) from None
    if len(raw_bytes) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{shown}: the recipe grew past {MAX_RECIPE_BYTES >> 20} MB while being read"])
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([f"{shown}: not UTF-8 text (byte {exc.start})"]) from None
    return _load_text(text, path, shown, allow_download=allow_download, check_files=check_files)


DICT_SOURCE = "<dict>"  # how problems of a recipe given as Python data name their source


def recipe_from_dict(data: Mapping[str, Any], *, base_dir: str | Path = ".", allow_download: bool = False,
                     check_files: bool = True) -> Recipe:
    """Validate a recipe given as Python data: the same keys and values as the YAML file.

    Relative paths resolve against `base_dir`. The recipe is kept (and frozen into the run
    folder) as the YAML text of `data`; problems name `<dict>` and the line in that text.
    Raises RecipeError listing every problem, as `load_recipe` does."""
    if not isinstance(data, Mapping):
        raise RecipeError([f"{DICT_SOURCE}:1:1: a recipe must be a mapping of keys (name, model, prompt, ...), got {type(data).__name__}"])
    try:
        text = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True, width=1 << 30)
    except yaml.YAMLError as exc:
        raise RecipeError([f"{DICT_SOURCE}:1:1: not plain data (text, numbers, lists, mappings): {' '.join(str(exc).split())}"]) from None
    path = Path(base_dir).expanduser() / f"{DICT_SOURCE}.yaml"
    return _load_text(text, path, DICT_SOURCE, allow_download=allow_download, check_files=check_files)


def _compose(text: str, shown: str) -> yaml.Node | None:
    """The YAML node tree of `text`, refusing deep nesting before composing it.
    Raises yaml.YAMLError (syntax) or RecipeError (limits)."""
    try:
        try:
            deep = _too_deep(text, _FAST_LOADER)
        except yaml.YAMLError:
            if _FAST_LOADER is yaml.SafeLoader:
                raise
            deep = _too_deep(text, yaml.SafeLoader)  # PyYAML's own error wording and marks
        if deep is not None:
            raise RecipeError([f"{shown}:{deep.line + 1}:{deep.column + 1}: lists and mappings nest more than "
                               f"{MAX_YAML_DEPTH} deep; a recipe needs a few levels"])
        return yaml.compose(text, Loader=_FAST_LOADER)
    except RecursionError:
        raise RecipeError([f"{shown}: the YAML nests too deep to read"]) from None


def _load_text(text: str, path: Path, shown: str, *, allow_download: bool, check_files: bool) -> Recipe:
    doc = _Doc(shown, check_files)
    if len(text.encode("utf-8")) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{shown}: the recipe is more than {MAX_RECIPE_BYTES >> 20} MB; recipes may be at most "
                           f"{MAX_RECIPE_BYTES >> 20} MB"])
    try:
        node = _compose(text, shown)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        lines = text.splitlines()
        near = [lines[m.line] for m in (exc.context_mark, exc.problem_mark) if m and m.line < len(lines)]
        if any(re.search(r":\s+[{\[][^}\]]*\|", ln) for ln in near):
            what += " (a prompt that starts with `{` must be quoted: prompt: \"{a|b} cat\")"
        elif "'\\t'" in what or "\t" in what:
            what += " (indent with spaces: YAML does not allow tabs for indentation)"
        elif "escape character" in what:
            what += " (inside double quotes YAML reads `\\` itself: use single quotes, 'a \\{b\\}', or write \\\\{)"
        raise RecipeError([f"{where}: YAML syntax error: {what}"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([f"{shown}: YAML error: {' '.join(str(exc).split())}"]) from None
    if node is None:
        raise RecipeError([f"{shown}:1:1: the recipe is empty; it needs at least `name`, `model` and `prompt`"])
    try:
        data = doc.build(node)
    except _TooManyValues as exc:
        mark = exc.node.start_mark
        raise RecipeError([f"{shown}:{mark.line + 1}:{mark.column + 1}: the recipe holds more than {MAX_YAML_VALUES} "
                           "values once YAML aliases (`*name`) are followed; shorten the lists (seeds take "
                           "`{start: N, count: M}`)"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{shown}:1:1: a recipe must be a mapping of keys (name, model, prompt, ...), got {type(data).__name__}"])
    if doc.problems:
        raise RecipeError(doc.problems)
    return _validate(doc, data, path, text, allow_download)


def _validate(doc: _Doc, data: dict, path: Path, text: str, allow_download: bool) -> Recipe:
    base = path.resolve().parent
    _check_keys(doc, data, SCHEMA, ())
    name = _text(doc, data, "name", required=True) or ""
    if name and not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", name):
        doc.problem(("name",), f"`name` {_show(name)} must be letters, digits, `.`, `_` or `-` (it names the run folder)")
    _text(doc, data, "description")
    checkpoint, family, vae, inpainting = _model(doc, data, base, allow_download)
    loras, lora_sets = _loras(doc, data, base)
    max_jobs = _max_jobs(doc, data)
    seeds = _seeds(doc, data, max_jobs)
    max_jobs = max_jobs or MAX_JOBS_LIMIT  # a wrong `max_jobs` is reported; count against the limit
    size_default = default_size(checkpoint, family)
    if "size" not in data and size_default is None and checkpoint:
        doc.problem((), "`size` is needed when `model.family` is auto (or set `model.family: sd15` for 512x512, `sdxl` for 1024x1024)")
    sizes = _axis(doc, data, "size", _size(doc), size_default)
    steps = _axis(doc, data, "steps", _int_in(doc, "steps", 1, 500), DEFAULTS["steps"])
    guidance = _axis(doc, data, "guidance", _num_in(doc, "guidance", 0.0, 50.0), DEFAULTS["guidance"])
    schedulers = _axis(doc, data, "scheduler", _scheduler(doc), DEFAULTS["scheduler"])
    inputs = recipe_inputs.read(doc, data, base, family=family, inpainting_model=inpainting, sizes=sizes, steps=steps,
                                checkpoint=checkpoint)
    others = [("LoRA sets", len(lora_sets) or 1)] + [(f"weights of LoRA {s.name}", len(s.weights)) for s in loras] + [
        ("sizes", len(sizes)), ("step counts", len(steps)), ("schedulers", len(schedulers)),
        ("guidance values", len(guidance))] + _input_counts(inputs)
    templates, variants, _ = _prompt_variants(
        doc, data, base, lambda n: _over_cap(others + [("prompt variants", n), ("seeds", len(seeds))], max_jobs))
    negative = _text(doc, data, "negative", default=DEFAULTS["negative"]) or ""
    if re.search(r"(?<!\\)\{[^}]*(?<!\\)\||__[A-Za-z0-9][\w\-./]*__", negative):
        doc.problem(("negative",), "`negative` is used as written: variant syntax `{a|b}` and `__wildcards__` are only "
                                   "expanded in prompts (put the variants in the prompt, or sweep with several recipes)")
    prompt_cfg = recipe_prompts.settings(doc, data, base)
    variants = recipe_prompts.check_prompts(doc, data, prompt_cfg, variants, negative, tuple(s.path for s in loras), max_jobs)
    clip_skip = data.get("clip_skip", DEFAULTS["clip_skip"])
    if not _is_int(clip_skip) or not 1 <= clip_skip <= 12:
        doc.problem(("clip_skip",), f"`clip_skip` must be a whole number from 1 to 12 (A1111 convention: 1 = last layer), got {_show(clip_skip)}")
    batch_size = data.get("batch_size", DEFAULTS["batch_size"])
    if not _is_int(batch_size) or not 1 <= batch_size <= 256:
        doc.problem(("batch_size",), f"`batch_size` must be a whole number from 1 to 256, got {_show(batch_size)}")
    if family in FAMILY_NAMES and doc.check_files:
        for where, lora_file in doc.lora_files:
            try:
                check_lora(lora_file, family)
            except ModelError as exc:
                doc.problem(where, exc.message)
    output_raw = _text(doc, data, "output")
    if output_raw is not None and not _is_path_text(output_raw):
        doc.problem(("output",), f"`output` must be a folder path, got {_show(output_raw)}")
        output_raw = None
    output = _resolve(base, output_raw).resolve() if output_raw else Path("runs") / (name or "run")
    upscale = _upscale(doc, data, base)
    hires = _hires(doc, data, base, sizes, steps)
    if hires is not None and inpainting:
        doc.problem(("hires",), "`hires` needs a base checkpoint: the second pass is img2img, which an inpainting model "
                                "(9-channel UNet) cannot run", key=True)
    render = _render_section(doc, data)
    if doc.problems:
        raise RecipeError(doc.problems)
    recipe = Recipe(
        path=path,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        name=name,
        checkpoint=checkpoint,
        family=family,
        vae=vae,
        loras=loras,
        lora_sets=lora_sets,
        templates=templates,
        prompts=variants,
        negative=negative,
        seeds=seeds,
        sizes=sizes,
        steps=steps,
        guidance=guidance,
        schedulers=schedulers,
        clip_skip=clip_skip,
        batch_size=batch_size,
        output=output,
        upscale=upscale,
        max_jobs=max_jobs,
        hires=hires,
        text=text,
        warnings=tuple(doc.missing),
        notes=tuple(doc.notes),
        prompt_syntax=prompt_cfg.syntax,
        emphasis=prompt_cfg.emphasis,
        embeddings=prompt_cfg.embeddings,
        lora_dir=prompt_cfg.lora_dir,
        inputs=inputs,
        inpainting=inpainting,
        render=render,
    )
    _check_job_count(doc, data, recipe)
    return recipe


def _max_jobs(doc: _Doc, data: dict) -> int | None:
    """`max_jobs`, bounded by MAX_JOBS_LIMIT so that no count the cap allows can exhaust memory."""
    max_jobs = data.get("max_jobs", DEFAULTS["max_jobs"])
    if not _is_int(max_jobs) or not 1 <= max_jobs <= MAX_JOBS_LIMIT:
        doc.problem(("max_jobs",), f"`max_jobs` must be a whole number from 1 to {MAX_JOBS_LIMIT}, got {_show(max_jobs)}")
        return None
    return max_jobs


def _over_cap(counts: list[tuple[str, int]], max_jobs: int) -> str | None:
    """The job-count problem when the axes' product exceeds `max_jobs` (pure arithmetic), else None."""
    total = 1
    for _, n in counts:
        total *= max(n, 1)
    if total <= max_jobs:
        return None
    spread = " x ".join(f"{n} {label}" for label, n in counts if n > 1)
    return f"the recipe expands to {total} jobs ({spread}), more than `max_jobs: {max_jobs}`; raise `max_jobs` or shrink an axis"


def _check_job_count(doc: _Doc, data: dict, recipe: Recipe) -> None:
    """Refuse a recipe over `max_jobs`, or one whose axes would give two jobs one id.

    Counted arithmetically from the axes: no job is built. Every axis but the LoRA stacks
    refuses repeated values itself, so two jobs can only coincide when two LoRA choices give
    the same stack (e.g. two LoRA sets with the same LoRAs): one image, two indices."""
    counts = axis_counts(recipe)
    total = 1
    for _, n in counts:
        total *= n
    over = _over_cap(counts, recipe.max_jobs)
    if over:
        doc.problem(("max_jobs",) if "max_jobs" in data else (), over)
        raise RecipeError(doc.problems)
    choices = lora_choices(recipe)
    per_choice = total // max(1, len(choices))
    seen: dict[tuple, int] = {}
    for number, (lora_set, stack, _) in enumerate(choices):
        key = tuple((lu.path, float(lu.weight)) for lu in stack)
        first = seen.setdefault(key, number)
        if first == number:
            continue
        first_set = choices[first][0]
        if first_set != lora_set:
            doc.problem(("lora_sets", lora_set), f"LoRA sets `{first_set}` and `{lora_set}` give the same LoRA "
                                                 "stack, so their jobs would be identical; remove one", key=True)
        else:
            doc.problem((), f"jobs {first * per_choice + 1} and {number * per_choice + 1} are identical (same model, LoRAs, "
                            "prompt, seed and settings); remove the repeated value")
        raise RecipeError(doc.problems)


# --- axes: what plan and validation both count ------------------------------------------------


def lora_choices(recipe: Recipe) -> list[tuple[str | None, tuple[LoraUse, ...], tuple[tuple[str, str], ...]]]:
    """Every LoRA stack the recipe sweeps, in plan order: (set name, stack, axis labels)."""
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
    ]
    if recipe.hires is not None:
        counts += [("hires sizes", len(recipe.hires.targets)), ("hires denoise values", len(recipe.hires.denoise))]
    counts += [
        ("step counts", len(recipe.steps)),
        ("schedulers", len(recipe.schedulers)),
        ("guidance values", len(recipe.guidance)),
        *_input_counts(recipe.inputs),
        ("prompt variants", len(recipe.prompts)),
        ("seeds", len(recipe.seeds)),
    ]
    return counts
