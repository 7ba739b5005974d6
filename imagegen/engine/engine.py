"""The loaded model: LoRA stacks, schedulers and batched, seed-exact generation.

torch and diffusers are imported inside methods only; `Engine` objects come from `open_engine`.
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ImagegenError, InputError, ModelError
from .. import samplers
from ..defaults import MAX_SEED
from ..models import FAMILIES
from .device_errors import EngineDeviceError, EngineOOM, classify, free_device_memory
from .hires import HiresRequest
from .controlnet import ControlRequest
from .photo import InitRequest
from .vae_decode import DecodePlan, apply_plan, decoding, plan_for

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

__all__ = ["ControlRequest", "Engine", "EngineDeviceError", "EngineOOM", "GenRequest", "GenResult", "InitRequest"]

@dataclass(frozen=True)
class GenRequest:
    """One image to render. All requests of one `generate` call share size, steps, guidance,
    scheduler and clip_skip; prompts, negatives and seeds may differ.

    `negative` "" means no negative prompt: diffusers' `negative_prompt=None` (SD1.5 encodes
    the empty string; SDXL uses zero embeddings, its `force_zeros_for_empty_prompt`).
    `clip_skip` is A1111's convention: None or 1 = the last CLIP layer, 2 = the penultimate one
    (diffusers' `clip_skip` is ours minus one).
    """

    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    clip_skip: int | None = None
    prompt_syntax: str = "a1111"  # "a1111": weights, BREAK, 75-token chunks; "plain": text as written (<= 75 tokens)
    emphasis: str = "original"  # A1111 emphasis: "original" | "no-norm" | "ignore" (see engine/text.py)
    hires: HiresRequest | None = None  # a second pass at a larger size (engine/hires.py)
    init: InitRequest | None = None  # an input photo: img2img, or inpainting with a mask (engine/photo.py)
    controlnet: tuple[ControlRequest, ...] = ()  # ControlNet units of the first pass (engine/controlnet.py)


@dataclass
class GenResult:
    """The image (PIL RGB), or None with `error` saying why (e.g. "NaN in output"). `first` is
    the first pass's image of a hires request with `keep_first`."""

    image: "PIL.Image.Image | None"
    error: str | None = None
    first: "PIL.Image.Image | None" = None


_SHARED = ("width", "height", "steps", "guidance", "scheduler", "clip_skip", "hires")


def diffusers_clip_skip(a1111_clip_skip: int | None) -> int | None:
    """A1111 clip skip (1 = last layer) to diffusers' (None = last layer, 1 = penultimate)."""
    if a1111_clip_skip is None or a1111_clip_skip <= 1:
        return None
    return a1111_clip_skip - 1


def scheduler_spec(name: str) -> samplers.SamplerSpec:
    """The sampler spec for `name`. Raises InputError listing the valid names."""
    spec = samplers.lookup_sampler(name)
    if spec is None:
        raise InputError(f"unknown `scheduler` {name!r}; valid: {', '.join(samplers.sampler_names())}")
    return spec


def adapter_name(index: int, path: str | Path) -> str:
    """A peft adapter name for a LoRA file: no dots (peft forbids them), unique by position."""
    stem = re.sub(r"[^0-9A-Za-z_]", "_", Path(path).stem)[:48]
    return f"lora{index}_{stem}"


class Engine:
    """A loaded SD1.5 or SDXL pipeline on one device, ready to render batches.

    Attributes: `family` ("sd15" | "sdxl"), `device` (e.g. "cuda", "cpu"), `dtype` ("fp16" |
    "bf16" | "fp32"), `model_name` (file stem, folder name or "builtin:<name>"), `pipeline` (the
    diffusers pipeline, usable directly).
    """

    def __init__(self, pipeline: Any, *, family: str, device: str, dtype: str, model_name: str) -> None:
        from ..modelfiles import INPAINT_CHANNELS

        self.pipeline = pipeline
        # An inpainting checkpoint (9-channel UNet): img2img and inpainting requests only.
        self.inpainting = getattr(getattr(pipeline, "unet", None), "config", {}).get("in_channels") == INPAINT_CHANNELS
        self.family = family
        self.spec = FAMILIES[family]  # the family's record: what differs between SD1.5 and SDXL
        self.device = device
        self.dtype = dtype
        self.model_name = model_name
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        self._loras: tuple[tuple[str, float], ...] = ()
        self._lora_stamps: tuple = ()  # (size, mtime) of each fused file: a rewritten file is reloaded
        self._backup: dict[tuple[str, str], tuple[Any, Any]] = {}  # original weights of LoRA targets, kept across switches
        self._touched: set[tuple[str, str]] = set()  # the targets the current LoRA set changed
        self._qkv: dict[str, tuple[dict, dict]] | None = None  # fused QKV: component -> (plain, fused) processors
        self._prompt_cache: dict[tuple, tuple] = {}
        self.compiled = False  # torch.compile'd UNet and VAE decoder (see `compile`)
        self._text_state = None  # textual-inversion embeddings (engine/text.py TextState)
        self._img2img: Any = None  # the img2img pipeline over the same components (hires pass, input photos)
        self._inpaint: Any = None  # the inpainting pipeline over the same components (9-channel UNets)
        self._hires_upscalers: dict[str, Any] = {}  # Real-ESRGAN weight file -> loaded Upscaler
        self._decode_plan: DecodePlan | None = None  # the VAE decode's dtype and slicing (engine/vae_decode.py)

    # -- the hires pass's pipelines ------------------------------------------------------------

    def img2img_pipeline(self) -> Any:
        """The family's img2img pipeline built once over this engine's loaded components
        (`from_pipe`: the same UNet, VAE and text encoders, with their fused LoRAs)."""
        if self._img2img is None:
            import diffusers

            self._img2img = getattr(diffusers, self.spec.img2img_class).from_pipe(self.pipeline)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def inpaint_pipeline(self) -> Any:
        """The family's inpainting pipeline over this engine's components (`from_pipe`), for an
        inpainting checkpoint's 9-channel UNet."""
        if self._inpaint is None:
            import diffusers

            self._inpaint = getattr(diffusers, self.spec.inpaint_class).from_pipe(self.pipeline)
            self._inpaint.set_progress_bar_config(disable=True)
        return self._inpaint

    def controlnet(self, path: str) -> Any:
        """The ControlNet in `path`, loaded (cached) on this engine's device and dtype for its UNet."""
        from .controlnet import load_controlnet

        return load_controlnet(path, self.family, device=self.device, dtype=self.dtype, unet=self.pipeline.unet)

    def hires_upscaler(self, path: str) -> Any:
        """The Real-ESRGAN network of `path`, loaded once on this engine's device."""
        up = self._hires_upscalers.get(path)
        if up is None:
            from ..upscale.model import load_upscaler

            up = self._hires_upscalers[path] = load_upscaler(path, device=self.device)
        return up

    def decode_plan(self) -> DecodePlan:
        """How the VAE decodes (dtype, slices) on this device: chosen and applied once
        (engine/vae_decode.py; CPU: as loaded)."""
        if self._decode_plan is None:
            self.set_decode_plan(plan_for(self.pipeline, self.device, self.family))
        return self._decode_plan  # type: ignore[return-value]

    def set_decode_plan(self, plan: DecodePlan) -> None:
        """Decode as `plan` says from now on (the VAE converted once)."""
        apply_plan(getattr(self.pipeline, "vae", None), plan)
        self._decode_plan = plan

    # -- compilation --------------------------------------------------------------------------

    def compile(self) -> None:
        """torch.compile the UNet and the VAE decoder in place, with static shapes and
        channels_last memory. The first batch of each shape pays for compiling. LoRA sets are
        then fused and their adapters unloaded (the module structure never changes, so
        switching sets does not recompile; the exact weight backup restores the originals). The
        attention projections are fused first (`fuse_qkv`)."""
        import torch

        if self.compiled:
            return
        pipe = self.pipeline
        self.decode_plan()  # the VAE in its decode dtype before its decoder is compiled
        self.fuse_qkv()
        # Parameters are guarded on requires_grad, which peft turns off when it loads a LoRA:
        # off from the start, so loading one never invalidates the graphs.
        pipe.unet.requires_grad_(False).to(memory_format=torch.channels_last)
        pipe.unet.compile(dynamic=False)
        vae = getattr(pipe, "vae", None)
        if vae is not None:
            vae.requires_grad_(False).to(memory_format=torch.channels_last)
            vae.decoder.compile(dynamic=False)
        self.compiled = True

    def fuse_qkv(self) -> None:
        """Fuse each attention's query/key/value projections into one matrix (key/value for
        cross-attention): diffusers' `fuse_qkv_projections`, on the UNet and on an AutoencoderKL
        VAE. `compile` calls it; it also works eager. LoRA switches undo it around the load and
        fuse (the plain projections get the LoRA) and then copy the new weights into the same
        fused matrices, with the same processor objects, so compiled graphs stay valid."""
        if self._qkv is not None:
            return
        import diffusers

        pipe = self.pipeline
        parts = [("unet", pipe.unet)]
        vae = getattr(pipe, "vae", None)
        if isinstance(vae, diffusers.AutoencoderKL):
            parts.append(("vae", vae))
        fused: dict[str, tuple[dict, dict]] = {}
        for name, model in parts:
            plain = dict(model.attn_processors)
            if any("Added" in type(proc).__name__ for proc in plain.values()):
                continue  # diffusers refuses added KV projections: leave that model as it is
            model.fuse_qkv_projections()
            fused[name] = (plain, dict(model.attn_processors))
        self._qkv = fused

    def _qkv_processors(self, which: int) -> None:
        """Put the plain (0) or the fused (1) attention processors back, the same objects each time."""
        for name, procs in (self._qkv or {}).items():
            getattr(self.pipeline, name).set_attn_processor(dict(procs[which]))  # it pops from the dict it gets

    def _refresh_fused_qkv(self) -> None:
        """Copy the UNet's current q/k/v weights (after a LoRA change) into its fused matrices, in place."""
        if not self._qkv or "unet" not in self._qkv:
            return
        import torch
        from diffusers.models.attention_processor import Attention

        with torch.no_grad():
            for module in self.pipeline.unet.modules():
                if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
                    continue
                parts = ["to_k", "to_v"] if module.is_cross_attention else ["to_q", "to_k", "to_v"]
                target = module.to_kv if module.is_cross_attention else module.to_qkv
                target.weight.copy_(torch.cat([getattr(module, p).weight for p in parts]))
                if target.bias is not None:
                    target.bias.copy_(torch.cat([getattr(module, p).bias for p in parts]))

    # -- schedulers --------------------------------------------------------------------------

    def _make_scheduler(self, name: str):
        import diffusers

        spec = scheduler_spec(name)
        cls = getattr(diffusers, spec.diffusers_class)
        try:
            return cls.from_config(samplers.scheduler_config(spec, self._base_scheduler_config), **spec.options)
        except ImportError as e:  # e.g. LMS needs scipy
            raise InputError(f"`scheduler` {name!r} is not available here: {_one_line(e)}") from None

    def scheduler_config(self, scheduler: str) -> dict:
        """The full config of the scheduler `generate` builds for `scheduler` (for provenance).

        Raises InputError for an unknown name.
        """
        sched = self._make_scheduler(scheduler)
        cfg = {**dict(sched.config), "_class_name": type(sched).__name__}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}

    # -- LoRAs -------------------------------------------------------------------------------

    @property
    def loras(self) -> tuple[tuple[str, float], ...]:
        """The LoRA set currently fused into the weights: (path, weight) pairs."""
        return self._loras

    def _lora_models(self) -> list[tuple[str, Any]]:
        names = getattr(self.pipeline, "_lora_loadable_modules", ["unet", "text_encoder"])
        return [(n, getattr(self.pipeline, n, None)) for n in names if getattr(self.pipeline, n, None) is not None]

    def set_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Make exactly `loras` ((path, weight) pairs, maybe empty) the fused LoRA set.

        No-op when it equals the current set and no file changed on disk since. Otherwise the previous set is unfused and unloaded
        and the original weights are restored bit for bit (so renders never depend on which
        LoRAs came before), then the new files are loaded as peft adapters, weighted with
        `set_adapters` and fused. Raises ModelError naming a file that is missing, for the other
        family, or does not fit this model (the engine is then left with no LoRA).
        """
        from ..modelfiles import check_lora

        want = tuple((str(p), float(w)) for p, w in loras)
        if want == self._loras and _file_stamps(want) == self._lora_stamps:
            return
        for path, _ in want:
            check_lora(path, self.family)
        stamps = _file_stamps(want)
        self._qkv_processors(0)  # plain projections while LoRAs load and fuse into them
        try:
            self._switch_loras(want, stamps)
        finally:
            self._refresh_fused_qkv()
            self._qkv_processors(1)

    def _switch_loras(self, want: tuple[tuple[str, float], ...], stamps: tuple) -> None:
        self._clear_loras()
        if not want:
            return
        pipe = self.pipeline
        names = [adapter_name(i, p) for i, (p, _) in enumerate(want)]
        failure = None
        try:
            with warnings.catch_warnings():  # peft warns on every second adapter: expected here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                self._load_adapters(want, names)
            pipe.set_adapters(names, adapter_weights=[w for _, w in want])
            self._backup_lora_targets()
            pipe.fuse_lora(components=[n for n, _ in self._lora_models()], adapter_names=names)
            if self.compiled:  # plain modules again, fused weights kept: the compiled graphs stay valid
                pipe.unload_lora_weights()
        except BaseException as e:
            failure = _device_failure(e, f"fusing {len(want)} LoRA(s) on {self.device}")
            if failure is None:
                self._loras = want  # so that _clear_loras undoes whatever got in
                self._clear_loras()
                raise
        if failure is not None:  # outside the except block: its traceback no longer holds memory
            self._loras = want
            self._clear_loras()
            free_device_memory()
            raise failure
        self._loras = want
        self._lora_stamps = stamps

    def _load_adapters(self, want: tuple[tuple[str, float], ...], names: list[str]) -> None:
        from diffusers.utils import logging as dlog

        pipe = self.pipeline
        for (path, _), name in zip(want, names):
            level = dlog.get_verbosity()
            dlog.set_verbosity(dlog.CRITICAL)  # its load errors become our ModelError below
            try:
                pipe.load_lora_weights(path, adapter_name=name)
            except (ValueError, KeyError, RuntimeError, OSError) as e:
                raise ModelError(f"LoRA {path}: cannot apply to {self.model_name}: {_one_line(e)}") from None
            finally:
                dlog.set_verbosity(level)
            loaded = {a for lst in pipe.get_list_adapters().values() for a in lst}
            if name not in loaded:
                raise ModelError(f"LoRA {path}: none of its layers match {self.model_name}")

    def _backup_lora_targets(self) -> None:
        """Keep the original weights of every layer the loaded LoRAs target. The backup lives as
        long as the engine: a layer backed up for an earlier set is not copied again."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for comp, model in self._lora_models():
            for mname, module in model.named_modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                self._touched.add((comp, mname))
                if (comp, mname) not in self._backup:
                    base = module.get_base_layer()
                    w = base.weight.detach().to("cpu", copy=True)
                    b = None if getattr(base, "bias", None) is None else base.bias.detach().to("cpu", copy=True)
                    self._backup[(comp, mname)] = (w, b)

    def _clear_loras(self) -> None:
        import torch

        pipe = self.pipeline
        if self._loras or self._touched or getattr(pipe, "_merged_adapters", None):
            comps = [n for n, _ in self._lora_models()]
            if getattr(pipe, "_merged_adapters", None) and not self.compiled:  # compiled: adapters already unloaded
                pipe.unfuse_lora(components=comps)
            pipe.unload_lora_weights()
            models = dict(self._lora_models())
            with torch.no_grad():
                for key in self._touched:
                    w, b = self._backup[key]
                    mod = models[key[0]].get_submodule(key[1])
                    mod.weight.copy_(w)
                    if b is not None:
                        mod.bias.copy_(b)
        self._touched = set()
        self._loras = ()
        self._lora_stamps = ()
        self._prompt_cache = {}

    # -- textual-inversion embeddings --------------------------------------------------------

    def set_embeddings(self, paths: Sequence[str | Path]) -> None:
        """Make exactly `paths` the textual-inversion embeddings that prompts may name (by file
        stem). Raises ModelError for a file that does not fit this model."""
        from .text import load_embeddings

        want = tuple(str(p) for p in paths)
        if want == (self._text_state.paths if self._text_state else ()):
            return
        encoders = [self.pipeline.text_encoder] + ([self.pipeline.text_encoder_2] if self.family == "sdxl" else [])
        self._text_state = load_embeddings(want, self.family, [e.config.hidden_size for e in encoders]) if want else None
        self._prompt_cache = {}

    # -- generation --------------------------------------------------------------------------

    def _check(self, requests: Sequence[GenRequest]) -> GenRequest:
        if not requests:
            raise InputError("`requests` is empty")
        first = requests[0]
        for r in requests[1:]:
            for f in _SHARED:
                if getattr(r, f) != getattr(first, f):
                    raise InputError(
                        f"all requests of a batch must share `{f}`: got {getattr(first, f)!r} and {getattr(r, f)!r}"
                    )
        for r in requests:
            if not 0 <= int(r.seed) <= MAX_SEED:
                raise InputError(f"`seed` must be in 0..{MAX_SEED}, got {r.seed}")
        if first.width % 8 or first.height % 8 or first.width < 8 or first.height < 8:
            raise InputError(f"`width` and `height` must be positive multiples of 8, got {first.width}x{first.height}")
        if first.steps < 1:
            raise InputError(f"`steps` must be >= 1, got {first.steps}")
        if first.clip_skip is not None and first.clip_skip < 1:
            raise InputError(f"`clip_skip` must be >= 1 (A1111 convention), got {first.clip_skip}")
        from ..prompt_syntax import EMPHASES, PROMPT_SYNTAXES

        for r in requests:
            if r.prompt_syntax not in PROMPT_SYNTAXES or r.emphasis not in EMPHASES:
                raise InputError(f"`prompt_syntax` must be one of {', '.join(PROMPT_SYNTAXES)} and `emphasis` one of "
                                 f"{', '.join(EMPHASES)}; got {r.prompt_syntax!r}, {r.emphasis!r}")
        scheduler_spec(first.scheduler)
        from .photo import check_init

        check_init(first, requests)
        if self.inpainting and first.init is None:
            raise InputError(f"{self.model_name} is an inpainting model (its UNet takes 9 input channels): it renders "
                             "requests with an input photo only (img2img, inpainting), not text-to-image")
        if self.inpainting and first.hires is not None:
            raise InputError(f"{self.model_name} is an inpainting model: a hires pass needs a base checkpoint")
        if first.hires is not None:
            from .hires import check_hires

            check_hires(first.hires)
            scheduler_spec(first.hires.scheduler)
        return first

    def _encode(self, prompt: str, negative: str, cfg: bool, clip_skip: int | None, syntax: str = "a1111",
                emphasis: str = "original") -> tuple:
        """Prompt embeddings for one (prompt, negative) pair, batch size 1: A1111 chunks and
        weights (engine/text.py) when the text needs them, else exactly as the pipeline would
        compute them itself; cached per LoRA set and embeddings."""
        key = (prompt, negative, cfg, clip_skip, syntax, emphasis)
        hit = self._prompt_cache.get(key)
        if hit is not None:
            return hit
        import torch

        from . import text

        pipe = self.pipeline
        if text.needs_chunking((prompt, negative) if cfg else (prompt,), syntax, emphasis, self._text_state):
            with text_model_alias(pipe.text_encoder):
                out = text.encode_pair(pipe, self.family, prompt, negative, cfg=cfg, clip_skip=clip_skip, syntax=syntax,
                                       emphasis=emphasis, state=self._text_state)
            if len(self._prompt_cache) > 64:
                self._prompt_cache.clear()
            self._prompt_cache[key] = out
            return out
        neg = negative if negative else None

        def encode(text: str | None, with_cfg: bool) -> tuple:
            if self.spec.pooled_text:
                return pipe.encode_prompt(
                    text, device=pipe._execution_device, num_images_per_prompt=1,
                    do_classifier_free_guidance=with_cfg, negative_prompt=neg, clip_skip=clip_skip,
                )  # fmt: skip
            return pipe.encode_prompt(text, pipe._execution_device, 1, with_cfg, negative_prompt=neg, clip_skip=clip_skip)

        with torch.no_grad(), text_model_alias(pipe.text_encoder if clip_skip else None):
            if cfg and clip_skip and (neg or not self.spec.pooled_text):
                # diffusers applies clip skip to the prompt only; A1111 (and ComfyUI's
                # CLIPSetLastLayer) apply it to the negative prompt as well. SDXL keeps its
                # zero embeddings for an empty negative.
                pos, negs = encode(prompt, False), encode(neg or "", False)
                out = (pos[0], negs[0], pos[2], negs[2]) if self.spec.pooled_text else (pos[0], negs[0])
            else:
                out = encode(prompt, cfg)
        if len(self._prompt_cache) > 64:
            self._prompt_cache.clear()
        self._prompt_cache[key] = out
        return out

    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Render one batch; result i belongs to request i.

        Each image's starting noise comes from its own `torch.Generator("cpu").manual_seed(seed)`,
        so an image does not depend on its batch or position, and equals a plain diffusers call
        `pipe(prompt, negative_prompt=..., width=, height=, num_inference_steps=, guidance_scale=,
        generator=torch.Generator("cpu").manual_seed(seed))` with the same scheduler.
        Each distinct (prompt, negative) pair is encoded once.

        With `hires`, the first pass is enlarged and rendered again by img2img (engine/hires.py);
        each image's generator continues into the second pass, so the plain diffusers equivalent
        passes the same generator object to the txt2img call and then to the img2img call.

        Raises InputError for mixed batch settings or bad values, EngineOOM when the device runs
        out of memory (cuBLAS/cuDNN allocation failures included), EngineDeviceError for a sticky
        CUDA error. An image with NaN values comes back with `error` set, not as an exception.
        """
        import torch

        from . import hires, photo, tail

        # 1. Check inputs: one size / steps / guidance / scheduler per batch.
        first = self._check(requests)
        pipe = self.pipeline
        cfg = first.guidance > 1.0
        clip_skip = diffusers_clip_skip(first.clip_skip)

        # 2. Scheduler, fresh for each batch (schedulers keep per-run state). SDE samplers draw
        #    their Brownian-tree noise per image from the image's own seed (batch-independent).
        pipe.scheduler = self._make_scheduler(first.scheduler)
        if hasattr(pipe.scheduler, "noise_sampler_seed"):
            pipe.scheduler.noise_sampler_seed = [int(r.seed) for r in requests]

        failure = None
        try:
            # 3. Encode each distinct prompt pair once, then stack in request order.
            enc = [self._encode(r.prompt, r.negative, cfg, clip_skip, r.prompt_syntax, r.emphasis) for r in requests]
            lengths = [e[0].shape[1] for e in enc]  # 77 x chunks
            if len(set(lengths)) > 1:  # never pad one image's prompt for another's: one call per length
                results: list[GenResult | None] = [None] * len(requests)
                for n in dict.fromkeys(lengths):
                    idx = [i for i, m in enumerate(lengths) if m == n]
                    for i, res in zip(idx, self.generate([requests[i] for i in idx])):
                        results[i] = res
                return results  # type: ignore[return-value]
            kwargs: dict[str, Any] = {"prompt_embeds": torch.cat([e[0] for e in enc])}
            if cfg:
                kwargs["negative_prompt_embeds"] = torch.cat([e[1] for e in enc])
            if self.spec.pooled_text:
                kwargs["pooled_prompt_embeds"] = torch.cat([e[2] for e in enc])
                if cfg:
                    kwargs["negative_pooled_prompt_embeds"] = torch.cat([e[3] for e in enc])

            # 4. One CPU generator per image, seeded with its own seed.
            generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests]

            # 5. Denoise and decode (a decode out of memory is retried alone, one image at a time).
            with torch.no_grad(), warnings.catch_warnings(), decode_in_slices_on_oom(getattr(pipe, "vae", None)), \
                    decoding(getattr(pipe, "vae", None), self.decode_plan()):
                warnings.filterwarnings("ignore", message=".*upcast_vae.*", category=FutureWarning)
                warnings.filterwarnings("ignore", message="Should have t.*>=t0")  # torchsde float rounding, harmless
                output_type = hires.first_output_type(first.hires) if first.hires else "np"
                if first.init is not None or first.controlnet:  # a photo and/or ControlNet (engine/photo.py)
                    firsts_out = photo.first_pass(self, requests, generators, kwargs, output_type)
                else:
                    firsts_out = pipe(
                        width=first.width,
                        height=first.height,
                        num_inference_steps=first.steps,
                        guidance_scale=first.guidance,
                        generator=generators,
                        output_type="pt" if first.hires is None else output_type,  # pt: 8 bits on the device (engine/tail.py)
                        **kwargs,
                    ).images
                images, firsts = firsts_out, None
                if first.hires is not None:  # 6. The hires pass, on the same generators.
                    images, firsts = hires.second_pass(self, first.hires, firsts_out, requests, generators, kwargs,
                                                       first.guidance)
        except BaseException as e:
            size = f"{first.width}x{first.height}" + (f" then {first.hires.width}x{first.hires.height}" if first.hires else "")
            failure = _device_failure(e, f"rendering {len(requests)} images at {size} on {self.device}")
            if failure is None:
                raise
        if failure is not None:  # outside the except block, so the failed activations can be freed
            vae = getattr(pipe, "vae", None)
            own = self.decode_plan().dtype is not None  # the VAE keeps a dtype of its own (engine/vae_decode.py)
            if vae is not None and not own and vae.dtype != pipe.unet.dtype:  # failed inside SDXL's fp32 VAE upcast
                vae.to(dtype=pipe.unet.dtype)
            free_device_memory()
            raise failure

        # 7. NaN check and 8-bit RGB, rounded as diffusers rounds its PIL output (on the device
        #    for a tensor batch; engine/tail.py); with `keep_unmasked`, the photo pasted back
        #    outside the mask.
        results = tail.results(images, firsts, GenResult)
        for r, res in zip(requests, results):
            if res.image is not None:
                res.image = photo.paste_back(res.image, r.init, hires=first.hires is not None)
            if res.first is not None:
                res.first = photo.paste_back(res.first, r.init, hires=False)
        return results


def _file_stamps(loras: tuple[tuple[str, float], ...]) -> tuple:
    """(size, mtime_ns, inode) of each LoRA file (None when unreadable: check_lora reports it)."""
    import os

    out = []
    for path, _ in loras:
        try:
            st = os.stat(path)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


@contextmanager
def text_model_alias(text_encoder: Any):
    """Let `text_encoder.text_model` name the model itself while in the block.

    transformers >= 5.6 flattened CLIPTextModel (no `.text_model` level), but diffusers'
    SD1.5 `encode_prompt` still reads `text_encoder.text_model.final_layer_norm` when `clip_skip`
    is set. The alias is a plain attribute (not a submodule, so no cycle) and is removed after:
    diffusers' LoRA loader uses its absence to detect the flattened layout.
    """
    if text_encoder is None or hasattr(text_encoder, "text_model"):
        yield
        return
    object.__setattr__(text_encoder, "text_model", text_encoder)
    try:
        yield
    finally:
        del text_encoder.__dict__["text_model"]


def _device_failure(e: BaseException, doing: str) -> ImagegenError | None:
    """EngineOOM or EngineDeviceError for a device error raised while `doing`; None otherwise."""
    kind = classify(e)
    if kind == "oom":
        return EngineOOM(f"out of memory {doing}: {_one_line(e)}")
    if kind == "sticky":
        return EngineDeviceError(f"device error {doing}, the device needs a restart of the process: {_one_line(e)}")
    return None


@contextmanager
def decode_in_slices_on_oom(vae: Any):
    """While in the block, `vae.decode` retries a batch that ran out of memory one latent at a
    time (diffusers' own `use_slicing` path), so an OOM in the decode keeps the denoised
    latents. The retry runs after the `except` block has released the failed attempt."""
    if vae is None or not hasattr(vae, "use_slicing"):
        yield
        return
    original = vae.decode

    def decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        retry = False
        try:
            return original(z, *args, **kwargs)
        except BaseException as e:
            if getattr(z, "shape", (1,))[0] <= 1 or vae.use_slicing or classify(e) != "oom":
                raise
            retry = True
        if retry:
            free_device_memory()
            vae.use_slicing = True
            try:
                return original(z, *args, **kwargs)
            finally:
                vae.use_slicing = False

    vae.decode = decode
    try:
        yield
    finally:
        del vae.decode


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
