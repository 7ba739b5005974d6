"""Load a Real-ESRGAN / ESRGAN weight file into our own network and run it on batches of tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.devices import resolve_device, resolve_dtype
from imagegen.errors import InputError, ModelError
from imagegen.fsutil import not_a_regular_file
from imagegen.metadata import sha256_file
from imagegen.upscale.archspec import ArchSpec
from imagegen.upscale.detect import detect, unwrap
from imagegen.upscale.registry import architecture

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass
class Upscaler:
    """A loaded upscaling network ready to run on `device` in `dtype`.

    `arch` is "RRDBNet" or "SRVGGNetCompact"; `scale` the output/input side ratio; `name` the
    file stem; `sha256` the weight file's hash (`short_hash` is its first 10 hex, A1111 style).
    """

    arch: str
    scale: int
    name: str
    sha256: str
    spec: ArchSpec
    path: Path
    device: str
    dtype: str
    module: Any  # torch.nn.Module

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def pad_multiple(self) -> int:
        """Input sides must be multiples of this (2 for x2 pixel-unshuffle models)."""
        return self.spec.pad_multiple

    def describe(self) -> str:
        """One line naming the network, e.g. `RRDBNet x4 (23 blocks, 64 feat, 32 grow; basicsr layout)`."""
        return architecture(self.spec.arch).describe(self.spec)

    def bytes_per_input_pixel(self) -> int:
        """Rough peak activation memory per input pixel of one tile (for choosing tile sizes)."""
        item = 4 if self.dtype == "float32" else 2
        return architecture(self.spec.arch).activation_bytes(self.spec, item)

    def __call__(self, batch: Any) -> Any:
        """Run the net on an NCHW float tensor in [0, 1] already on `device`; returns it clamped."""
        import torch

        with torch.inference_mode():
            out = self.module(batch.to(getattr(torch, self.dtype)))
            return out.clamp_(0, 1)


def _read_state(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read safetensors file ({exc})") from None
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, IndexError, ...) on junk
        raise ModelError(_unreadable_weights(path, exc)) from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: weight file holds a {type(state).__name__}, expected a state dict")
    return state


def _unreadable_weights(path: Path, exc: Exception) -> str:
    """One line saying why `path` is not a weight file we load, and what is expected.

    torch's own message is not repeated: for a pickle that needs code execution it advises
    `weights_only=False`, which is exactly what must not be done with a file of unknown origin."""
    expected = "expected Real-ESRGAN weights: a PyTorch .pth (zip or pickle of tensors) or a .safetensors file"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return f"{path}: cannot read weight file ({err.strerror})"
    if "weights_only" in str(exc) or "WeightsUnpickler" in str(exc):
        return (f"{path}: refused: this pickle holds Python objects besides tensors, and loading it could run "
                f"code; {expected} (convert it to .safetensors on a machine you trust)")
    if head.startswith(b"PK"):
        return f"{path}: cannot read weight file: a damaged or unsupported zip checkpoint (no readable tensor data); {expected}"
    return (f"{path}: cannot read weight file: it is neither a PyTorch checkpoint (zip or pickle of tensors) nor "
            f"safetensors; {expected}")


def build_module(spec: ArchSpec) -> Any:
    """A fresh (randomly initialised) network for `spec`."""
    return architecture(spec.arch).build(spec)


def load_upscaler(path: str | Path, *, device: str | None = None, dtype: str | None = None) -> Upscaler:
    """Load a `.pth` (torch.load, weights_only) or `.safetensors` Real-ESRGAN/ESRGAN weight file.

    Detects RRDBNet (BasicSR or old ESRGAN keys, x1/x2/x4, any block count and width) and
    SRVGGNetCompact. Raises `InputError` for a missing file or bad `device`/`dtype`, and
    `ModelError` for an unreadable file or an unknown layout (the message lists the known ones).
    """
    import torch

    path = Path(path)
    special = not_a_regular_file(path)
    if special:
        raise InputError(f"`model` {path} {special}")
    if not path.is_file():
        raise InputError(f"`model` file not found: {path}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelError(f"{path}: `model` must be a {', '.join(WEIGHT_SUFFIXES)} file; got {path.suffix or 'no suffix'!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, half_on_cpu=False)
    # 1. Read and unwrap the state dict.
    state = dict(unwrap(_read_state(path)))
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(state):
        bad = next(k for k, v in state.items() if not isinstance(v, torch.Tensor))
        raise ModelError(f"{path}: entry `{bad}` is not a tensor; expected a plain state dict")
    # 2. Detect the architecture from names and shapes.
    spec = detect({k: tuple(v.shape) for k, v in tensors.items()}, path=str(path))
    tensors = architecture(spec.arch).convert(tensors, spec)
    # 3. Build our module and load strictly (any missing or extra key is an error).
    module = build_module(spec)
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        line = str(exc).strip().splitlines()
        raise ModelError(f"{path}: weights do not fit {architecture(spec.arch).describe(spec)}: {' '.join(line[1:3])[:300]}") from None
    module.eval().requires_grad_(False)
    # channels_last is faster for these convs on CUDA (cuDNN) and on CPU (oneDNN, ~30%).
    module.to(device=dev, dtype=getattr(torch, dt), memory_format=torch.channels_last)
    if dev.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # tiles repeat a few shapes: pick the fastest kernels
    return Upscaler(
        arch=spec.arch, scale=spec.scale, name=path.stem, sha256=sha256_file(path), spec=spec,
        path=path, device=dev, dtype=dt, module=module,
    )
