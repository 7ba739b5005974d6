"""`imagegen import`: an image's metadata (A1111 / civitai / ComfyUI-with-A1111-text infotext,
or imagegen's own JSON) -> a recipe that renders it again, ready for seed sweeps.

imagegen images come back exactly (model, LoRA and embedding paths, every setting from the
job's content). Infotext comes back field by field; LoRAs are found in `lora_dir` by their
AddNet hash, then by name. Nothing is dropped silently: every field without a recipe key
becomes a YAML comment, and whatever cannot be resolved (a model or LoRA not found, an unknown
sampler) is written so that `imagegen validate` says so. Torch-free.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imagegen.errors import InputError
from imagegen.metadata import (
    HIRES_DENOISE, PARAMETERS_KEY, PROVENANCE_KEY, parse_controlnet, parse_hires, parse_parameters, read_png_text,
)
from imagegen.samplers import lookup_sampler

# Infotext fields that become recipe keys (the rest are kept as comments).
_USED = {"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Clip skip", "Emphasis",
         "Denoising strength", "Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler",
         "Hires schedule type", HIRES_DENOISE, "Mask blur"}
_EMPHASIS = {"Original": "original", "No norm": "no-norm", "None": "ignore"}


@dataclass
class Imported:
    """The recipe text and the problems a person should look at (also in the text as comments)."""

    text: str
    notes: list[str] = field(default_factory=list)


def read_metadata(path: str | Path) -> tuple[str | None, dict | None]:
    """(infotext, imagegen provenance) of a PNG, or (the file's text, None) for a `.txt`.
    Raises InputError for a missing file or one without either."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: file not found")
    if p.suffix.lower() == ".txt":
        return p.read_text(encoding="utf-8", errors="replace"), None
    try:
        chunks = read_png_text(p)
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{p}: not a readable image ({e})") from None
    prov = None
    if chunks.get(PROVENANCE_KEY):
        try:
            prov = json.loads(chunks[PROVENANCE_KEY])
        except ValueError:
            prov = None
    text = chunks.get(PARAMETERS_KEY)
    if text is None and prov is None:
        raise InputError(f"{p}: no A1111 `parameters` text and no imagegen metadata in the file")
    return text, prov


def _name(stem: str) -> str:
    name = re.sub(r"[^\w.\-]+", "-", stem).strip("-.") or "imported"
    return name if re.match(r"[A-Za-z0-9]", name) else "r" + name


def _escape_variants(prompt: str) -> str:
    """Prompt text as a recipe template: our variant characters made literal (A1111's `\\(`
    escapes pass through the variant expander as they are)."""
    out = []
    for i, ch in enumerate(prompt):
        if ch == "\\":
            nxt = prompt[i + 1] if i + 1 < len(prompt) else ""
            out.append("\\" if nxt in "()[]" else "\\\\")
        elif ch in "{}|":
            out.append("\\" + ch)
        elif ch == "_" and ("__" in prompt):
            out.append("\\_")
        else:
            out.append(ch)
    return "".join(out)


def _value(value: Any) -> str:
    """One YAML value on one line (flow style; quoted where YAML needs it)."""
    text = yaml.safe_dump(value, allow_unicode=True, sort_keys=False, width=10**6, default_flow_style=True).rstrip("\n")
    return text[:-4].rstrip("\n") if text.endswith("\n...") else text


def _dump(key: str, value: Any) -> str:
    return f"{key}: {_value(value)}"


def _lora_files(lora_dir: Path | None) -> list[Path]:
    if lora_dir is None or not lora_dir.is_dir():
        return []
    return sorted(p for p in lora_dir.rglob("*.safetensors") if p.is_file())


def _find_lora(name: str, short_hash: str | None, files: list[Path]) -> Path | None:
    if short_hash:
        from imagegen.metadata import addnet_hash

        for f in files:
            try:
                if addnet_hash(f).startswith(short_hash.lower()):
                    return f
            except (OSError, ValueError):
                continue
    return next((f for f in files if f.stem == name), None) or next((f for f in files if f.stem.lower() == name.lower()), None)


def _find_model(name: str, short_hash: str | None, model_dir: Path | None) -> Path | None:
    if model_dir is None or not model_dir.is_dir():
        return None
    files = sorted(p for p in model_dir.rglob("*.safetensors") if p.is_file())
    hit = next((f for f in files if f.stem == name), None)
    if hit or not short_hash:
        return hit
    from imagegen.metadata import sha256_file

    return next((f for f in files if sha256_file(f).startswith(short_hash.lower())), None)


def from_provenance(prov: dict, name: str) -> Imported:
    """The recipe of an imagegen job: its content, exactly."""
    c = prov["content"]
    lines = [f"# imported from imagegen job {prov.get('id', '?')} (index {prov.get('index', '?')})", _dump("name", name), "model:"]
    lines.append("  " + _dump("checkpoint", c["model"]))
    if prov.get("family"):
        lines.append("  " + _dump("family", prov["family"]))
    if c.get("vae"):
        lines.append("  " + _dump("vae", c["vae"]))
    if c["loras"]:
        lines.append("loras:")
        names = {lu.get("path"): lu.get("name") for lu in prov.get("loras", [])}
        for path, weight in c["loras"]:
            entry: dict[str, Any] = {"path": path, "weight": weight}
            if names.get(path) and names[path] != Path(path).stem:
                entry["name"] = names[path]
            lines.append("  - " + _value(entry))
    lines.append(_dump("prompt", _escape_variants(c["prompt"])))
    if c["negative"]:
        lines.append(_dump("negative", c["negative"]))
    w, h = c["size"]
    lines += [_dump("seeds", [c["seed"]]), _dump("size", f"{w}x{h}"), _dump("steps", c["steps"]),
              _dump("guidance", c["guidance"]), _dump("scheduler", c["scheduler"]), _dump("clip_skip", c["clip_skip"])]
    for key in ("prompt_syntax", "emphasis"):
        if key in c:
            lines.append(_dump(key, c[key]))
    if c.get("embeddings"):
        lines.append(_dump("embeddings", list(c["embeddings"])))
    if c.get("hires"):
        lines += _hires_lines(prov)
    lines += _input_lines(prov)
    lines.append(_dump("output", f"runs/{name}"))
    return Imported("\n".join(lines) + "\n")


def _input_lines(prov: dict) -> list[str]:
    """`init_image`, `denoise`, `mask` ... and `controlnet:` of an imagegen job, from the paths its
    JSON recorded (the recipe checks their sha256 again: a changed photo is a new job)."""
    c, lines = prov["content"], []
    ci, pi = c.get("input"), prov.get("input") or {}
    if ci:
        lines += [_dump("init_image", pi.get("photo", "PHOTO.png")), _dump("denoise", ci["denoise"])]
        if "mask" in ci:
            lines += [_dump("mask", pi.get("mask", "MASK.png")), _dump("mask_blur", ci["mask_blur"]),
                      _dump("keep_unmasked", ci["keep_unmasked"])]
    units = prov.get("controlnet") or []
    if c.get("controlnet"):
        lines.append("controlnet:")
        for cu, pu in zip(c["controlnet"], units + [{}] * len(c["controlnet"])):
            entry: dict[str, Any] = {"model": cu["model"]}
            if cu["image"] != "photo":
                entry["image"] = pu.get("image", "CONTROL.png")
            if cu["preprocess"] != "none":
                entry["preprocess"] = cu["preprocess"]
            if cu["preprocess"] == "canny":
                entry |= {"low": cu["low"], "high": cu["high"]}
            entry |= {"weight": cu["weight"], "start": cu["start"], "end": cu["end"]}
            lines.append("  - " + _value(entry))
    return lines


def _hires_lines(prov: dict) -> list[str]:
    """The `hires:` section of an imagegen job: the target as the recipe gave it (so the job id is
    the same), then every setting explicit."""
    hr = prov["content"]["hires"]
    passes = prov.get("passes") or []
    given = next((p.get("given") for p in passes if p.get("pass") == "hires" and p.get("given")), None)
    kind, value = given if given else ("width", hr["size"][0])
    return ["hires:", "  " + _dump(kind, value), "  " + _dump("upscaler", hr["upscaler"]), "  " + _dump("denoise", hr["denoise"]),
            "  " + _dump("steps", hr["steps"]), "  " + _dump("scheduler", hr["scheduler"])]


# A1111's hires upscaler names -> ours (others are model names: a weight file to point at).
_A1111_HIRES = {"Latent": "latent", "Latent (bicubic)": "latent-bicubic", "Latent (nearest)": "latent-nearest",
                "Lanczos": "lanczos"}


def from_infotext(text: str, name: str, *, lora_dir: Path | None = None, model: Path | None = None,
                  model_dir: Path | None = None) -> Imported:
    """A recipe from A1111 infotext (see the module docstring)."""
    p = parse_parameters(text)
    fields = {k: v for k, v in p.items() if k not in ("prompt", "negative", "loras", "scheduler")}
    if "Steps" not in fields and "Seed" not in fields:
        raise InputError("no A1111 settings line (`Steps: ..., Sampler: ..., Seed: ...`) in the text")
    notes: list[str] = []
    lines = [f"# imported from A1111 infotext{' (' + fields['Version'] + ')' if fields.get('Version') else ''}",
             _dump("name", name), "model:"]
    model_name = str(fields.get("Model", ""))
    ckpt = model or _find_model(model_name, fields.get("Model hash"), model_dir)
    if ckpt is None:
        ckpt = Path(f"{model_name or 'MODEL'}.safetensors")
        notes.append(f"model `{model_name}` (hash {fields.get('Model hash', '?')}) not found: set `model.checkpoint`")
    lines.append("  " + _dump("checkpoint", str(ckpt)))
    hashes = {}
    for part in str(fields.get("Lora hashes", "")).split(","):
        if ":" in part:
            n, h = part.rsplit(":", 1)
            hashes[n.strip()] = h.strip()
    files = _lora_files(lora_dir)
    if p["loras"]:
        lines.append("loras:")
    for lname, weight in p["loras"]:
        found = _find_lora(lname, hashes.get(lname), files)
        if found is None:
            found = (lora_dir or Path(".")) / f"{lname}.safetensors"
            notes.append(f"LoRA `{lname}` (hash {hashes.get(lname, '?')}) not found in {lora_dir or '--lora-dir'}")
        entry: dict[str, Any] = {"path": str(found), "weight": weight}
        if found.stem != lname:
            entry["name"] = lname
        lines.append("  - " + _value(entry))
    lines.append(_dump("prompt", _escape_variants(p["prompt"]) or " "))
    if p["negative"]:
        lines.append(_dump("negative", p["negative"]))

    def number(key: str, cast):
        try:
            return cast(fields[key])
        except (KeyError, ValueError):
            return None

    seed = number("Seed", int)
    if seed is not None:
        lines.append(_dump("seeds", [seed]))
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(fields.get("Size", "")))
    if m:
        lines.append(_dump("size", f"{m.group(1)}x{m.group(2)}"))
    else:
        notes.append("no `Size` field: set `size`")
    for key, rkey, cast in (("Steps", "steps", int), ("CFG scale", "guidance", float)):
        v = number(key, cast)
        if v is not None:
            lines.append(_dump(rkey, v))
    sampler = p.get("scheduler")
    if sampler is None and fields.get("Sampler"):
        raw = f"{fields['Sampler']} {fields.get('Schedule type', '')}".strip()
        notes.append(f"sampler `{raw}` has no imagegen equivalent: pick a `scheduler`")
        sampler = raw
    if sampler:
        lines.append(_dump("scheduler", sampler))
    clip = number("Clip skip", int)
    if clip is not None:
        lines.append(_dump("clip_skip", clip))
    if fields.get("Emphasis"):
        mode = _EMPHASIS.get(str(fields["Emphasis"]))
        if mode:
            lines.append(_dump("emphasis", mode))
        else:
            notes.append(f"emphasis `{fields['Emphasis']}` is not one imagegen knows")
    hires = parse_hires(fields)
    if hires is not None:
        lines.append("hires:")
        if hires["scale"] is not None:
            lines.append("  " + _dump("scale", hires["scale"]))
        else:
            w, h = hires["size"]
            lines.append("  " + (_dump("width", w) if w else _dump("height", h)))
        up = _A1111_HIRES.get(str(hires["upscaler"]))
        if up is None:
            up = f"{hires['upscaler']}.pth"
            notes.append(f"hires upscaler `{hires['upscaler']}`: set `hires.upscaler` to its Real-ESRGAN weight file "
                         "(or latent / lanczos)")
        lines.append("  " + _dump("upscaler", up))
        lines.append("  " + _dump("denoise", hires["denoise"]))
        if hires["steps"]:
            lines.append("  " + _dump("steps", hires["steps"]))
        if hires["scheduler"]:
            lines.append("  " + _dump("scheduler", hires["scheduler"]))
    lines += _infotext_input_lines(fields, hires is not None, notes)
    if fields.get("TI hashes"):
        notes.append(f"the prompt uses textual-inversion embeddings ({fields['TI hashes']}): add `embeddings:`")
    if lora_dir is not None and not p["loras"] and "<lora:" in text:
        notes.append("`<lora:...>` tags found but not read")
    lines.append(_dump("output", f"runs/{name}"))
    kept = [(k, v) for k, v in fields.items() if k not in _USED and not k.startswith("ControlNet ")]
    if kept:
        lines.append("# infotext fields without a recipe key (kept here, not used):")
        lines += [f"#   {k}: {' '.join(str(v).splitlines())}" for k, v in kept]
    if notes:
        lines.append("# check before rendering:")
        lines += [f"#   {n}" for n in notes]
    return Imported("\n".join(lines) + "\n", notes)


def _infotext_input_lines(fields: dict[str, Any], has_hires: bool, notes: list[str]) -> list[str]:
    """img2img / inpainting / ControlNet keys of A1111 infotext: `Denoising strength` is the photo's
    when the image has no hires pass (or names the hires one `Hires denoising strength`)."""
    lines: list[str] = []
    img2img = "Denoising strength" in fields and (not has_hires or HIRES_DENOISE in fields)
    if img2img:
        lines.append(_dump("init_image", "PHOTO.png"))
        notes.append("the image was made from an input photo, which infotext does not name: set `init_image`")
        try:
            lines.append(_dump("denoise", float(fields["Denoising strength"])))
        except ValueError:
            notes.append(f"`Denoising strength: {fields['Denoising strength']}` is not a number")
        if "Mask blur" in fields:
            lines.append(_dump("mask", "MASK.png"))
            notes.append("the image was inpainted: set `mask` (white = repaint), or `mask: alpha`")
            try:
                lines.append(_dump("mask_blur", float(fields["Mask blur"])))
            except ValueError:
                pass
    units = parse_controlnet(fields)
    if units:
        lines.append("controlnet:")
        for u in units:
            entry: dict[str, Any] = {"model": f"{u['model'] or 'CONTROLNET'}.safetensors"}
            if not img2img:
                entry["image"] = "CONTROL.png"
            if u["module"] == "canny":
                entry["preprocess"] = "canny"
                entry |= {k: u[k] for k in ("low", "high") if u[k] is not None}
            elif u["module"] not in (None, "none"):
                notes.append(f"ControlNet module `{u['module']}` is not one imagegen has (canny, none)")
            entry |= {k: u[k] for k in ("weight", "start", "end") if u[k] is not None}
            lines.append("  - " + _value(entry))
            notes.append(f"ControlNet model `{u['model']}` (hash {u['model_hash'] or '?'}): set its `.safetensors` path")
    return lines


def import_image(path: str | Path, *, lora_dir: str | Path | None = None, model: str | Path | None = None,
                 model_dir: str | Path | None = None, name: str | None = None) -> Imported:
    """The recipe for `path` (PNG with metadata, or an infotext `.txt`): imagegen's own JSON
    when present (exact), else the A1111 infotext. Raises InputError when there is neither."""
    text, prov = read_metadata(path)
    recipe_name = _name(name or Path(path).stem)
    if prov and isinstance(prov.get("content"), dict) and not prov.get("upscale"):
        return from_provenance(prov, recipe_name)
    if text is None:
        raise InputError(f"{path}: no A1111 `parameters` text to import")
    return from_infotext(text, recipe_name, lora_dir=Path(lora_dir) if lora_dir else None,
                         model=Path(model) if model else None, model_dir=Path(model_dir) if model_dir else None)
