"""The recipe keys of A1111 prompt text: `prompt_syntax`, `emphasis`, `embeddings`, `lora_dir`,
and the checks `validate` runs on every expanded prompt (weights, `<lora:...>` tags, token and
chunk counts). Torch-free; called by `recipe.py`, which owns the YAML and error positions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen import prompt_syntax as ps
from imagegen.errors import InputError

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_QUIET_CHUNKS = 3  # validate warns when a prompt becomes more chunks than this
SCHEMA_KEYS = ("prompt_syntax", "emphasis", "embeddings", "lora_dir")


@dataclass(frozen=True)
class PromptSettings:
    syntax: str = ps.DEFAULT_SYNTAX
    emphasis: str = ps.DEFAULT_EMPHASIS
    embeddings: tuple[str, ...] = ()  # every embedding file the recipe offers
    lora_dir: str | None = None


def _files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _vector_count(path: Path) -> int:
    """Vectors of an embedding file, from the safetensors header (1 when unknown: `.pt`)."""
    if path.suffix.lower() != ".safetensors":
        return 1
    from imagegen.modelfiles import read_safetensors_shapes
    from imagegen.errors import ModelError

    try:
        shapes = read_safetensors_shapes(path)
    except ModelError:
        return 1
    shape = shapes.get("clip_l") or shapes.get("emb_params") or next(iter(shapes.values()), (1,))
    return int(shape[0]) if len(shape) == 2 else 1


def settings(doc: Any, data: dict, base: Path) -> PromptSettings:
    """Read and check the four keys (problems go to `doc`)."""
    syntax = data.get("prompt_syntax", ps.DEFAULT_SYNTAX)
    if syntax not in ps.PROMPT_SYNTAXES:
        doc.problem(("prompt_syntax",), f"`prompt_syntax` must be one of {', '.join(ps.PROMPT_SYNTAXES)}, got {syntax!r}")
        syntax = ps.DEFAULT_SYNTAX
    emphasis = data.get("emphasis", ps.DEFAULT_EMPHASIS)
    if emphasis not in ps.EMPHASES:
        doc.problem(("emphasis",), f"`emphasis` must be one of {', '.join(ps.EMPHASES)}, got {emphasis!r}")
        emphasis = ps.DEFAULT_EMPHASIS
    if syntax == "plain" and "emphasis" in data:
        doc.problem(("emphasis",), "`emphasis` has no effect with `prompt_syntax: plain` (brackets are text there)", key=True)
    lora_dir = None
    if "lora_dir" in data:
        raw = data["lora_dir"]
        if not isinstance(raw, str) or not raw.strip():
            doc.problem(("lora_dir",), f"`lora_dir` must be a folder path, got {raw!r}")
        else:
            p = (base / Path(raw).expanduser()).resolve()
            if not p.is_dir():
                doc.missing_file(("lora_dir",), f"`lora_dir` folder not found: `{p}`")
            lora_dir = str(p)
    files: list[Path] = []
    raw = data.get("embeddings")
    if raw is not None:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
            doc.problem(("embeddings",), f"`embeddings` must be a folder or a list of files, got {raw!r}")
            items = []
        for i, item in enumerate(items):
            where = ("embeddings",) if isinstance(raw, str) else ("embeddings", i)
            p = (base / Path(item).expanduser()).resolve()
            if p.is_dir():
                found = _files_under(p, EMBEDDING_SUFFIXES)
                if not found:
                    doc.problem(where, f"embeddings folder `{p}` has no .safetensors or .pt files")
                files += found
            elif not p.exists():
                doc.missing_file(where, f"embedding file not found: `{p}`")
            elif p.suffix.lower() not in EMBEDDING_SUFFIXES:
                doc.problem(where, f"embedding `{p}`: use .safetensors or .pt files")
            else:
                files.append(p)
        stems: dict[str, Path] = {}
        for f in files:
            if f.stem in stems:
                doc.problem(("embeddings",), f"two embeddings are named `{f.stem}`: `{stems[f.stem]}` and `{f}`")
            stems[f.stem] = f
    return PromptSettings(syntax, emphasis, tuple(str(f) for f in files), lora_dir)


def _lora_index(folder: str | None) -> dict[str, str]:
    if not folder or not Path(folder).is_dir():
        return {}
    index: dict[str, str] = {}
    for f in _files_under(Path(folder), (".safetensors",)):
        index.setdefault(f.stem, str(f))
    return index


def check_prompts(doc: Any, data: dict, cfg: PromptSettings, variants: tuple, negative: str,
                  recipe_loras: tuple[str, ...], max_jobs: int | None = None) -> tuple:
    """Variants with their `<lora:...>` tags moved into `loras` and the embeddings they use in
    `embeddings`; problems (bad weights, unknown LoRA names, plain prompts over 75 tokens) go to
    `doc`, a prompt of more than MAX_QUIET_CHUNKS chunks is a note. More variants than
    `max_jobs` are left unchecked: the job cap refuses the recipe anyway, and quickly."""
    if max_jobs is not None and len(variants) > max_jobs:
        return variants
    index = _lora_index(cfg.lora_dir)
    specs = [ps.Embedding(Path(f).stem, tuple(ps.clip_tokenize(Path(f).stem)), _vector_count(Path(f)))
             for f in cfg.embeddings]
    by_stem = {Path(f).stem: f for f in cfg.embeddings}

    def template_path(t: int) -> tuple:
        return ("prompt",) if "prompt" in data else ("prompts", t)

    def text_problems(text: str, where: tuple, what: str) -> tuple[str, ...]:
        """Weight syntax, length; returns the embeddings the text uses."""
        if cfg.syntax == "a1111" and cfg.emphasis != "ignore":
            try:
                ps.parse_weights(text)
            except ps.PromptWeightError as e:
                doc.problem(where, f"{what}: {e.message} (column {e.column}): {text[:60]!r}")
                return ()
        if cfg.syntax == "plain":
            n = ps.token_count(text, "plain")
            if n > ps.CHUNK_TOKENS:
                doc.problem(where, f"{what} {text[:60]!r}{'...' if len(text) > 60 else ''} is {n} CLIP tokens; "
                                   f"`prompt_syntax: plain` allows {ps.CHUNK_TOKENS} (use a1111 syntax to chunk it)")
            return ()
        chunks = ps.chunk_prompt(ps.prompt_runs(text, cfg.syntax, cfg.emphasis), ps.clip_tokenize, eos=ps.EOS_ID,
                                 comma=ps.COMMA_ID, embeddings=specs) if text else []
        if len(chunks) > MAX_QUIET_CHUNKS and not warned.get(where):
            warned[where] = True
            doc.notes.append(f"{doc.at(where)}: {what} {text[:40]!r}... becomes {len(chunks)} chunks of 75 tokens "
                               f"(more than {MAX_QUIET_CHUNKS}); each chunk is encoded on its own: check that it is meant to be this long")
        used = {name for c in chunks for _, name in c.embeddings}
        return tuple(by_stem[n] for n in sorted(used))

    warned: dict[tuple, bool] = {}
    checked: set[str] = set()
    seen_jobs: dict[tuple, str] = {}
    try:
        _, neg_tags = ps.extract_lora_tags(negative)
    except InputError:
        neg_tags = [None]
    if neg_tags:
        doc.problem(("negative",), "`<lora:...>` tags work in the prompt only (A1111 reads them there); move them")
    neg_used = text_problems(negative, ("negative",), "`negative`") if negative else ()
    out = []
    for pv in variants:
        where = template_path(pv.template)
        try:
            text, tags = ps.extract_lora_tags(pv.text)
        except InputError as e:
            doc.problem(where, f"{e.message}: {pv.text[:60]!r}")
            continue
        loras = []
        for tag in tags:
            path = index.get(tag.name)
            if path is None:
                if cfg.lora_dir is None:
                    doc.problem(where, f"`<lora:{tag.name}:{tag.weight:g}>` needs `lora_dir:` (the folder its file is in)")
                else:
                    doc.problem(where, f"`<lora:{tag.name}:{tag.weight:g}>`: no `{tag.name}.safetensors` in `lora_dir` {cfg.lora_dir}")
                continue
            if path in recipe_loras or path in [p for p, _, _ in loras]:
                doc.problem(where, f"LoRA `{tag.name}` is given twice (a `<lora:>` tag and `loras:`, or two tags) in {pv.text[:60]!r}")
                continue
            loras.append((path, tag.name, tag.weight))
            if path not in checked:
                checked.add(path)
                doc.lora_files.append((where, path))
        used = text_problems(text, where, "prompt")
        key = (text, tuple(loras))
        if key in seen_jobs:
            doc.problem(where, f"prompt variants {seen_jobs[key][:60]!r} and {pv.text[:60]!r} are the same prompt and LoRAs once "
                               "the `<lora:...>` tags are taken out; their jobs would collide")
            continue
        seen_jobs[key] = pv.text
        out.append(dataclasses.replace(pv, text=text, loras=tuple(loras),
                                       embeddings=tuple(sorted(set(used) | set(neg_used)))))
    return tuple(out)
