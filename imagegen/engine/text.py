"""Prompt embeddings the A1111 way: 75-token chunks, emphasis weights, textual-inversion
embeddings, for SD1.5 (CLIP-L) and SDXL (CLIP-L + OpenCLIP-G).

Per encoder and chunk: ids = BOS + 75 + EOS (CLIP-L pads with EOS; OpenCLIP-G with 0 after
the first EOS); the chunk goes through the encoder with embedding vectors written over the
placeholder token embeddings; the layer is the one diffusers would use (clip skip per chunk);
then emphasis: "original" multiplies each token's vector by its weight and rescales the chunk so
its mean equals the mean before weighting, "no-norm" only multiplies, "ignore" parses nothing.
Chunks concatenate along the sequence axis (77·k); the prompt and the negative are padded to
the same chunk count with empty-prompt chunks. SDXL concatenates its two encoders on the feature
axis, takes the pooled vector from OpenCLIP-G's first chunk, and keeps zeros for an empty
negative (the model's `force_zeros_for_empty_prompt`).

Mean-rescale guard: when a chunk's mean before or after weighting is near zero (|mean| < 1e-3
of the mean absolute value) or the two have opposite signs, the rescale would divide noise by
noise or flip the embedding (a random-weight CLIP's final layer norm gives a mean of ~1e-9), so
that chunk keeps its "no-norm" weighting instead. Trained CLIP encoders are far from that point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import prompt_syntax as ps
from ..errors import InputError, ModelError

MEAN_GUARD = 1e-3  # relative size under which a chunk mean counts as zero (see the docstring)


# --- textual-inversion embeddings --------------------------------------------------------------


def load_embedding_file(path: str | Path) -> dict[str, Any]:
    """Vectors of one embedding file: {"clip_l": (n, 768) tensor, "clip_g": ...} for SDXL
    files, {"": tensor} for SD1.5 (A1111 `.pt` with `string_to_param`, `emb_params`
    safetensors, or a single-tensor file). `.pt` is read with `weights_only=True`.
    Raises ModelError for a missing, unreadable or unrecognised file."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"embedding {p}: file not found")
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(p))
        elif p.suffix.lower() in (".pt", ".bin"):
            data = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise ModelError(f"embedding {p}: use a .safetensors or .pt file, got `{p.suffix}`")
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"embedding {p}: cannot read: {' '.join(str(e).split())[:200]}") from None
    if isinstance(data, dict) and "string_to_param" in data:
        data = data["string_to_param"]
    if not isinstance(data, dict):
        data = {"": data}
    if "clip_l" in data or "clip_g" in data:
        out = {k: data[k] for k in ("clip_l", "clip_g") if k in data}
    elif "emb_params" in data:
        out = {"": data["emb_params"]}
    elif len(data) == 1:
        out = {"": next(iter(data.values()))}
    else:
        raise ModelError(f"embedding {p}: unrecognised layout (keys {', '.join(map(str, list(data)[:5]))})")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or v.ndim not in (1, 2):
            raise ModelError(f"embedding {p}: `{k or 'vectors'}` is not a vector list")
        out[k] = v.detach().float().reshape(-1, v.shape[-1])
    return out


@dataclass
class TextState:
    """What prompt encoding needs beyond the pipeline: the loaded embeddings by name (file stem)."""

    embeddings: dict[str, dict[str, Any]]
    paths: tuple[str, ...] = ()


def load_embeddings(paths: Sequence[str | Path], family: str, widths: Sequence[int]) -> TextState:
    """Load embedding files for a `family` model whose encoders have `widths` (hidden sizes).
    Raises ModelError for a file that does not fit (other family, other width, same stem twice)."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        name = Path(path).stem
        if name in out:
            raise ModelError(f"embedding {path}: two embeddings are named `{name}`")
        vecs = load_embedding_file(path)
        if family == "sdxl":
            if set(vecs) != {"clip_l", "clip_g"}:
                raise ModelError(f"embedding {path}: an SD1.5 embedding; SDXL needs `clip_l` and `clip_g` vectors")
            keys = ("clip_l", "clip_g")
        else:
            if "" not in vecs:
                raise ModelError(f"embedding {path}: an SDXL embedding (`clip_l`/`clip_g`); the model is SD1.5")
            keys = ("",)
        for key, width in zip(keys, widths):
            if vecs[key].shape[-1] != width:
                raise ModelError(f"embedding {path}: vectors {vecs[key].shape[-1]} wide, the text encoder is {width} wide")
        if family == "sdxl" and vecs["clip_l"].shape[0] != vecs["clip_g"].shape[0]:
            raise ModelError(f"embedding {path}: `clip_l` and `clip_g` have different vector counts")
        out[name] = {k: vecs[k] for k in keys}
    return TextState(out, tuple(str(p) for p in paths))


# --- chunked encoding ----------------------------------------------------------------------------


def _embedding_specs(state: TextState | None) -> list[ps.Embedding]:
    if not state:
        return []
    return [ps.Embedding(n, tuple(ps.clip_tokenize(n)), next(iter(v.values())).shape[0]) for n, v in state.embeddings.items()]


def needs_chunking(texts: Sequence[str], syntax: str, emphasis: str, state: TextState | None) -> bool:
    """False when every text reads the same as plain text in one chunk (so diffusers' own
    encoder gives exactly the A1111 result); raises InputError for `plain` text over 75 tokens."""
    specs = _embedding_specs(state)
    for text in texts:
        if syntax == "plain":
            n = ps.token_count(text, "plain")
            if n > ps.CHUNK_TOKENS:
                raise InputError(f"prompt {text[:60]!r}{'...' if len(text) > 60 else ''} is {n} CLIP tokens, more than "
                                 f"{ps.CHUNK_TOKENS}; with `prompt_syntax: plain` nothing is cut: shorten it or use a1111 syntax")
            continue
        runs = ps.prompt_runs(text, syntax, emphasis)
        if len(runs) != 1 or runs[0].is_break or runs[0].text != text:
            return True
        ids = ps.clip_tokenize(text)
        if len(ids) > ps.CHUNK_TOKENS:
            return True
        if any(tuple(ids[i:i + len(e.name_ids)]) == e.name_ids for e in specs for i in range(len(ids))):
            return True
    return False


def _chunks(text: str, syntax: str, emphasis: str, specs: list[ps.Embedding]) -> list[ps.Chunk]:
    return ps.chunk_prompt(ps.prompt_runs(text, syntax, emphasis), ps.clip_tokenize, eos=ps.EOS_ID, comma=ps.COMMA_ID,
                           embeddings=specs)


def apply_emphasis(z: Any, multipliers: Any, emphasis: str) -> Any:
    """Weight one chunk's (77, D) output by per-token `multipliers` (77,), per `emphasis`."""
    if emphasis == "ignore":
        return z
    weighted = z * multipliers.to(z.dtype)[:, None]
    if emphasis == "no-norm":
        return weighted
    before, after = z.float().mean(), weighted.float().mean()
    tiny = MEAN_GUARD * weighted.float().abs().mean()
    if before.abs() < tiny or after.abs() < tiny or before * after <= 0:
        return weighted  # see the module docstring: the guard
    return weighted * (before / after).to(z.dtype)


def _encode_chunks(encoder: Any, chunks: list[ps.Chunk], *, pad_after_eos: int | None, hidden: int | None,
                   final_norm: bool, emphasis: str, vectors: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """(77·k, D) embeddings and the encoder's first output of the first chunk (pooled for SDXL's
    OpenCLIP-G). `hidden` None = last_hidden_state; else that hidden_states index."""
    import torch

    ids = torch.tensor([c.input_ids(ps.BOS_ID, ps.EOS_ID, pad_after_eos) for c in chunks], device=device)
    fixes = [(b, off + 1, vectors[name]) for b, c in enumerate(chunks) for off, name in c.embeddings]
    handle = None
    if fixes:
        def put_vectors(module, args, out):
            out = out.clone()
            for b, start, vec in fixes:
                out[b, start:start + vec.shape[0]] = vec.to(out.device, out.dtype)
            return out

        handle = encoder.get_input_embeddings().register_forward_hook(put_vectors)
    try:
        out = encoder(ids, output_hidden_states=hidden is not None)
    finally:
        if handle is not None:
            handle.remove()
    if hidden is None:
        z = out[0]
    else:
        z = out.hidden_states[hidden]
        if final_norm:
            z = getattr(encoder, "text_model", encoder).final_layer_norm(z)
    mult = torch.tensor([c.multipliers() for c in chunks], device=z.device)
    z = torch.stack([apply_emphasis(z[i], mult[i], emphasis) for i in range(len(chunks))])
    return z.reshape(1, -1, z.shape[-1]), out[0][:1]


def encode_pair(pipe: Any, family: str, prompt: str, negative: str, *, cfg: bool, clip_skip: int | None,
                syntax: str, emphasis: str, state: TextState | None) -> tuple:
    """Embeddings for one (prompt, negative) pair, batch size 1, in the layout of diffusers'
    `encode_prompt`: SD1.5 (prompt, negative or None); SDXL (prompt, negative, pooled,
    negative pooled). `clip_skip` is diffusers' (None = default layer)."""
    import torch

    specs = _embedding_specs(state)
    pos = _chunks(prompt, syntax, emphasis, specs)
    neg = _chunks(negative, syntax, emphasis, specs) if cfg else []
    empty = ps.Chunk((ps.EOS_ID,) * ps.CHUNK_TOKENS, (1.0,) * ps.CHUNK_TOKENS)
    k = max(len(pos), len(neg))
    pos += [empty] * (k - len(pos))
    if cfg:
        neg += [empty] * (k - len(neg))
    device = pipe._execution_device
    vec = {n: v for n, v in (state.embeddings.items() if state else ())}

    with torch.no_grad():
        if family == "sd15":
            te = pipe.text_encoder
            hidden = None if clip_skip is None else -(clip_skip + 1)

            def enc(chunks):
                z, _ = _encode_chunks(te, chunks, pad_after_eos=None, hidden=hidden, final_norm=True, emphasis=emphasis,
                                      vectors={n: v[""] for n, v in vec.items()}, device=device)
                return z.to(dtype=te.dtype, device=device)

            return enc(pos), (enc(neg) if cfg else None)

        hidden = -2 if clip_skip is None else -(clip_skip + 2)

        def enc_xl(chunks):
            z1, _ = _encode_chunks(pipe.text_encoder, chunks, pad_after_eos=None, hidden=hidden, final_norm=False,
                                   emphasis=emphasis, vectors={n: v["clip_l"] for n, v in vec.items()}, device=device)
            z2, pooled = _encode_chunks(pipe.text_encoder_2, chunks, pad_after_eos=0, hidden=hidden, final_norm=False,
                                        emphasis=emphasis, vectors={n: v["clip_g"] for n, v in vec.items()}, device=device)
            dt = pipe.text_encoder_2.dtype
            return torch.cat([z1, z2], dim=-1).to(dtype=dt, device=device), pooled.to(dtype=dt, device=device)

        p, pp = enc_xl(pos)
        if not cfg:
            return p, None, pp, None
        if not negative and pipe.config.get("force_zeros_for_empty_prompt", True):
            return p, torch.zeros_like(p), pp, torch.zeros_like(pp)
        n, npool = enc_xl(neg)
        return p, n, pp, npool
