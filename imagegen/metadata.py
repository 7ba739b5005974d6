"""PNG text chunks in and out: A1111 `parameters` infotext and full JSON provenance.

`parameters` follows A1111's layout exactly, so A1111's PNG Info, civitai and sd-parsers read
our images::

    a red vase <lora:style:0.8>
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 1024x1024, Model hash: 0123456789, Model: sd_xl_base_1.0, Lora hashes: "style: 0123456789ab", Version: imagegen 0.1.0

Values that contain `,`, `:` or a newline are JSON-quoted, as A1111 does. LoRAs appear as
`<lora:name:weight>` tags after the prompt (how A1111 records and re-applies them).
The `imagegen` chunk holds JSON: the job's canonical content (enough to re-render it),
recipe name and hash, model and LoRA sha256, scheduler config, library versions, device,
dtype and timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imagegen.defaults import cache_root
from imagegen.errors import StoppedError
from imagegen.fsutil import write_bytes_atomic
from imagegen.samplers import from_infotext, infotext_schedule, lookup_sampler

PARAMETERS_KEY = "parameters"
PROVENANCE_KEY = "imagegen"
MODEL_HASH_LEN = 10  # A1111 "Model hash": first 10 hex of the file's sha256
LORA_HASH_LEN = 12  # A1111 "Lora hashes": first 12 hex of the AddNet hash (see `addnet_hash`)


def a1111_quote(value: Any) -> str:
    """Quote a value as A1111 does: JSON when it contains `,`, `:` or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_parameters(
    *,
    prompt: str,
    negative: str,
    steps: int,
    scheduler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    model_hash: str | None = None,
    loras: list[tuple[str, float, str | None]] = (),  # (name, weight, AddNet hash or None)
    clip_skip: int = 1,
    version: str = "",
    extra: dict[str, Any] | None = None,
) -> str:
    """The A1111 infotext for one image."""
    spec = lookup_sampler(scheduler)
    sampler = spec.a1111_sampler if spec else scheduler
    tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight, _ in loras)
    lines = [prompt + tags]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields: list[tuple[str, Any]] = [("Steps", steps), ("Sampler", sampler)]
    if spec and infotext_schedule(spec):
        fields.append(("Schedule type", infotext_schedule(spec)))
    fields += [("CFG scale", f"{guidance:g}"), ("Seed", seed), ("Size", f"{width}x{height}")]
    if model_hash:
        fields.append(("Model hash", model_hash[:MODEL_HASH_LEN]))
    fields.append(("Model", model_name))
    if clip_skip and clip_skip > 1:
        fields.append(("Clip skip", clip_skip))
    hashed = [(n, h) for n, _, h in loras if h]
    if hashed:
        fields.append(("Lora hashes", ", ".join(f"{n}: {h[:LORA_HASH_LEN]}" for n, h in hashed)))
    for key, value in (extra or {}).items():
        fields.append((key, value))
    if version:
        fields.append(("Version", version))
    lines.append(", ".join(f"{k}: {a1111_quote(v)}" for k, v in fields))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([-+0-9.eE]+)(?::[^>]*)?>")


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 infotext into `prompt`, `negative`, `loras` [(name, weight)] and the fields
    of the last line (values unquoted, as strings)."""
    lines = text.strip("\n").split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        for key, value in _FIELD.findall(lines[-1]):
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            fields[key.strip()] = value.strip() if isinstance(value, str) else value
        lines = lines[:-1]
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    loras = [(m.group(1), float(m.group(2))) for m in _LORA_TAG.finditer(prompt)]
    prompt = _LORA_TAG.sub("", prompt).strip()
    out: dict[str, Any] = {"prompt": prompt, "negative": "\n".join(negative_lines), "loras": loras}
    out.update(fields)
    ours = str(fields.get("Version", "")).startswith("imagegen")  # we always write the schedule where it matters
    spec = from_infotext(fields.get("Sampler", ""), fields.get("Schedule type", ""), a1111_defaults=not ours)
    if spec is not None:
        out["scheduler"] = spec.name
    return out


# --- the hires pass in the infotext (A1111's keys) ---------------------------------------------


def hires_fields(*, given: tuple[str, float | int], width: int, height: int, steps: int, upscaler: str, denoise: float,
                 scheduler: str, first_scheduler: str) -> dict[str, Any]:
    """A1111's infotext keys for a hires pass, in A1111's order: `Denoising strength`, `Hires
    upscale` (a scale) or `Hires resize` (a size), `Hires steps`, `Hires upscaler`, and `Hires
    sampler` / `Hires schedule type` only when they differ from the first pass's.
    `upscaler` is the name as A1111 writes it (`Latent`, `Lanczos`, a model's name)."""
    out: dict[str, Any] = {"Denoising strength": f"{denoise:g}"}
    if given[0] == "scale":
        out["Hires upscale"] = f"{given[1]:g}"
    else:
        out["Hires resize"] = f"{width}x{height}"
    out["Hires steps"] = steps
    out["Hires upscaler"] = upscaler
    spec, first = lookup_sampler(scheduler), lookup_sampler(first_scheduler)
    if spec and first:
        if spec.a1111_sampler != first.a1111_sampler:
            out["Hires sampler"] = spec.a1111_sampler
        if spec.schedule_type != first.schedule_type:
            out["Hires schedule type"] = spec.schedule_type or "Automatic"
    elif scheduler != first_scheduler:
        out["Hires sampler"] = scheduler
    return out


def parse_hires(fields: dict[str, Any]) -> dict[str, Any] | None:
    """The hires pass of parsed infotext (`parse_parameters`), or None when it has none:
    `scale` or `size` [w, h], `steps` (None: the first pass's), `upscaler` (A1111's name),
    `denoise`, and `scheduler` (a recipe name; None: the first pass's)."""
    if "Hires upscale" not in fields and "Hires resize" not in fields:
        return None
    out: dict[str, Any] = {"scale": None, "size": None}
    try:
        if "Hires upscale" in fields:
            out["scale"] = float(fields["Hires upscale"])
        else:
            w, _, h = str(fields["Hires resize"]).partition("x")
            out["size"] = [int(w), int(h)]
        out["steps"] = int(fields["Hires steps"]) if int(fields.get("Hires steps", 0) or 0) > 0 else None
        out["denoise"] = float(fields.get(HIRES_DENOISE, fields.get("Denoising strength", 0.7)))
    except ValueError:
        return None
    out["upscaler"] = fields.get("Hires upscaler", "Latent")
    scheduler = None
    if "Hires sampler" in fields or "Hires schedule type" in fields:
        sampler = fields.get("Hires sampler", fields.get("Sampler", ""))
        schedule = fields.get("Hires schedule type", fields.get("Schedule type", ""))
        spec = from_infotext(sampler, "" if schedule == "Automatic" else schedule)
        scheduler = spec.name if spec else sampler
    out["scheduler"] = scheduler
    return out


# --- input photos and ControlNet in the infotext (A1111's keys) --------------------------------

HIRES_DENOISE = "Hires denoising strength"  # ours: a hires pass's strength when `Denoising strength` is the photo's
CONTROLNET_KEY = "ControlNet {}"  # A1111's sd-webui-controlnet: one key per unit, `ControlNet 0`, `ControlNet 1`, ...
CONTROLNET_MODULES = {"canny": "canny", "none": "none"}  # our `preprocess` -> the extension's module name


def input_fields(*, denoise: float | None = None, mask_blur: float | None = None,
                 controlnet: list[dict] = ()) -> dict[str, Any]:
    """A1111's infotext keys for an input photo and ControlNet units: `Denoising strength`,
    `Mask blur` (inpainting) and `ControlNet N: "Module: canny, Model: name [hash8], Weight: 0.8,
    Resize Mode: Crop and Resize, Threshold A: 100, Threshold B: 200, Guidance Start: 0,
    Guidance End: 0.8"` (the keys sd-webui-controlnet writes). Each unit is a dict with
    `preprocess`, `model_name`, `model_hash` (or None), `weight`, `start`, `end`, `low`, `high`."""
    out: dict[str, Any] = {}
    if denoise is not None:
        out["Denoising strength"] = f"{denoise:g}"
    if mask_blur is not None:
        out["Mask blur"] = f"{mask_blur:g}"
    for i, u in enumerate(controlnet):
        model = u["model_name"] + (f" [{u['model_hash'][:8]}]" if u.get("model_hash") else "")
        parts = [f"Module: {CONTROLNET_MODULES.get(u['preprocess'], u['preprocess'])}", f"Model: {model}",
                 f"Weight: {u['weight']:g}", "Resize Mode: Crop and Resize"]
        if u["preprocess"] == "canny":
            parts += [f"Threshold A: {u['low']}", f"Threshold B: {u['high']}"]
        parts += [f"Guidance Start: {u['start']:g}", f"Guidance End: {u['end']:g}"]
        out[CONTROLNET_KEY.format(i)] = ", ".join(parts)
    return out


def parse_controlnet(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """The ControlNet units of parsed infotext, in order: `module`, `model` (the name, the
    `[hash]` cut off), `model_hash`, `weight`, `start`, `end`, `low`, `high` (None when absent)."""
    units = []
    i = 0
    while CONTROLNET_KEY.format(i) in fields:
        parts = dict(p.split(":", 1) for p in str(fields[CONTROLNET_KEY.format(i)]).split(", ") if ":" in p)
        parts = {k.strip(): v.strip() for k, v in parts.items()}
        m = re.fullmatch(r"(.*?)\s*(?:\[([0-9a-fA-F]+)\])?", parts.get("Model", ""))

        def num(key: str, cast: Any = float) -> Any:
            try:
                return cast(float(parts[key])) if cast is int else cast(parts[key])
            except (KeyError, ValueError):
                return None

        units.append({"module": parts.get("Module"), "model": m.group(1) if m else parts.get("Model"),
                      "model_hash": m.group(2) if m else None, "weight": num("Weight"), "start": num("Guidance Start"),
                      "end": num("Guidance End"), "low": num("Threshold A", int), "high": num("Threshold B", int)})
        i += 1
    return units


# --- PNG text chunks: the one reader and writer ------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_text_payload(key: str, text: str, *, compress: bool = False) -> tuple[bytes, bytes]:
    """(chunk type, chunk data) for a text chunk, as A1111 and Pillow write them: tEXt (zTXt when
    `compress`) when `text` is Latin-1, else iTXt (UTF-8, compressed when `compress`)."""
    k = key.encode("latin-1")
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        body = zlib.compress(text.encode("utf-8")) if compress else text.encode("utf-8")
        return b"iTXt", k + b"\0" + (b"\1\0" if compress else b"\0\0") + b"\0\0" + body
    if compress:
        return b"zTXt", k + b"\0\0" + zlib.compress(raw)
    return b"tEXt", k + b"\0" + raw


def png_text_chunk(key: str, text: str, *, compress: bool = False) -> bytes:
    """A whole text chunk (see `png_text_payload`), for writers that emit PNG bytes themselves."""
    return png_chunk(*png_text_payload(key, text, compress=compress))


def provenance_text(provenance: dict) -> str:
    """The `imagegen` JSON as stored in an image: strict JSON (see `strict_json`)."""
    return strict_json(provenance)


def png_text_chunks(parameters: str, provenance: dict) -> "Any":
    """A PIL PngInfo with our two text chunks: `parameters` plain (A1111 readers), `imagegen`
    compressed."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add(*png_text_payload(PARAMETERS_KEY, parameters))
    info.add(*png_text_payload(PROVENANCE_KEY, provenance_text(provenance), compress=True))
    return info


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(value: Any) -> str:
    """JSON that every parser accepts (JavaScript's `JSON.parse` included): non-finite floats,
    e.g. a scheduler's `lambda_min_clipped: -inf`, become the strings "Infinity", "-Infinity"
    and "NaN" instead of Python's bare `-Infinity` tokens."""
    return json.dumps(_finite(value), ensure_ascii=False, sort_keys=True, allow_nan=False)


def read_png_text(path: str | Path) -> dict[str, str]:
    """tEXt/zTXt/iTXt chunks of a PNG, read chunk by chunk without decoding pixels (any image size).

    Raises OSError if the file is unreadable, ValueError if it is not a PNG or a chunk is corrupt."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise ValueError(f"{path}: not a PNG file")
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            n, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                if kind == b"IEND":
                    break
                f.seek(n + 4, 1)
                continue
            data = f.read(n)
            f.seek(4, 1)
            try:
                if kind == b"tEXt":
                    k, _, v = data.partition(b"\0")
                    out[k.decode("latin-1")] = v.decode("latin-1")
                elif kind == b"zTXt":
                    k, _, v = data.partition(b"\0")
                    out[k.decode("latin-1")] = zlib.decompress(v[1:]).decode("latin-1")
                elif kind == b"iTXt":
                    k, _, rest = data.partition(b"\0")
                    flag = rest[0]
                    _lang, _, rest = rest[2:].partition(b"\0")
                    _tk, _, v = rest.partition(b"\0")
                    out[k.decode("latin-1")] = (zlib.decompress(v) if flag else v).decode("utf-8")
            except (zlib.error, IndexError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}: corrupt {kind.decode('latin-1')} chunk ({exc})") from None
    return out


def read_provenance(path: str | Path) -> dict | None:
    """The `imagegen` JSON of an image, or None when absent or unreadable."""
    try:
        text = read_png_text(path).get(PROVENANCE_KEY)
        return json.loads(text) if text else None
    except (OSError, ValueError, SyntaxError):
        return None


# --- file hashes, computed once --------------------------------------------------------------

_CACHE_LOCK = threading.Lock()


def _hash_cache_path() -> Path:
    return cache_root() / "file-hashes.json"


_STOP_CHECKS: list[Callable[[], str | None]] = []  # see `stoppable`


@contextlib.contextmanager
def stoppable(should_stop: Callable[[], str | None]) -> Iterator[None]:
    """While inside, hashing checks `should_stop()` between 4-MB blocks and raises StoppedError
    when it names a signal, so a long hash (a multi-GB checkpoint) honours SIGINT/SIGTERM."""
    _STOP_CHECKS.append(should_stop)
    try:
        yield
    finally:
        _STOP_CHECKS.remove(should_stop)


def _check_stop(path: str | Path) -> None:
    for check in _STOP_CHECKS:
        reason = check()
        if reason:
            raise StoppedError(reason, f"hashing {path}")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (not cached; see `sha256_file` for model files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            _check_stop(path)
    return h.hexdigest()


MAX_CACHED_HASHES = 2000  # entries kept in file-hashes.json (oldest dropped first)


def _cache_key(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        stamp = hashlib.sha256("".join(f"{f.relative_to(path)}|{f.stat().st_size}|{f.stat().st_mtime_ns};"
                                       for f in files).encode()).hexdigest()[:16]
        return f"{path}|dir|{stamp}"
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


class _CacheFile:
    """file-hashes.json under a lock that holds across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> dict:
        import fcntl

        _CACHE_LOCK.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            self.fd = None  # a read-only cache folder only costs time
        try:
            cache = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}  # a damaged cache is rebuilt, never fatal
        if not isinstance(cache, dict):
            return {}
        return {k: v for k, v in cache.items() if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)}

    def save(self, cache: dict) -> None:
        if self.fd is None:
            return
        keep = dict(list(cache.items())[-MAX_CACHED_HASHES:])
        try:
            write_bytes_atomic(self.path, json.dumps(keep).encode("utf-8"))
        except OSError:
            pass  # a cache that cannot be written only costs time

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
        _CACHE_LOCK.release()


def addnet_hash_of_file(path: str | Path) -> str:
    """The "AddNet" hash A1111 and civitai identify a LoRA by: kohya's `sshs_model_hash` from the
    safetensors metadata when present, else the sha256 of the bytes after the safetensors header
    (full hex; A1111 shows the first 12). Not cached; see `addnet_hash`. Raises OSError or
    ValueError for an unreadable or non-safetensors file."""
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        header = f.read(n)
        try:
            meta = json.loads(header.decode("utf-8")).get("__metadata__") or {}
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
        given = str(meta.get("sshs_model_hash") or "").strip().lower()
        if re.fullmatch(r"[0-9a-f]{12,64}", given):
            return given
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            _check_stop(path)
    return h.hexdigest()


def addnet_hash(path: str | Path) -> str:
    """`addnet_hash_of_file`, cached like `sha256_file`."""
    path = Path(path).resolve()
    key = "addnet|" + _cache_key(path)
    cache_file = _CacheFile(_hash_cache_path())
    with cache_file as cache:
        if key in cache:
            return cache[key]
    digest = addnet_hash_of_file(path)
    with cache_file as cache:
        cache.pop(key, None)
        cache[key] = digest
        cache_file.save(cache)
    return digest


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (or, for a folder, of its files' names and hashes), cached by
    (absolute path, size, mtime) so multi-GB checkpoints are hashed once."""
    path = Path(path).resolve()
    key = _cache_key(path)
    cache_file = _CacheFile(_hash_cache_path())
    with cache_file as cache:
        if key in cache:
            return cache[key]
    if path.is_dir():
        h = hashlib.sha256()
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(sub.relative_to(path)).encode() + b"\0" + file_sha256(sub).encode())
        digest = h.hexdigest()
    else:
        digest = file_sha256(path)
    with cache_file as cache:
        cache.pop(key, None)
        cache[key] = digest  # newest last
        cache_file.save(cache)
    return digest
