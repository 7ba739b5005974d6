"""Recognise an upscaler weight file from its key names and tensor shapes.

Works on a mapping `name -> shape` so it needs no torch. Each architecture in
`registry.ARCHITECTURES` is asked in order whether the keys are its own (`match`), and the
first that claims them reads its settings from the shapes (`detect`): scale, block count,
width, pixel-unshuffle factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from imagegen.errors import ModelError
from imagegen.upscale.archspec import ArchSpec, LayoutMismatch
from imagegen.upscale.registry import ARCHITECTURES

# The layouts we understand, quoted in the error for anything else.
LAYOUTS: tuple[str, ...] = tuple(text for arch in ARCHITECTURES for _, text in arch.layouts)


def unwrap(state: Mapping[str, object]) -> Mapping[str, object]:
    """Take the weights out of a BasicSR `params_ema` / `params` wrapper and drop `module.`."""
    for wrapper in ("params_ema", "params", "state_dict"):
        inner = state.get(wrapper) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            state = inner
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _fail(path: str, why: str) -> ModelError:
    return ModelError(
        f"{path}: not a Real-ESRGAN/ESRGAN weight file ({why}); understood layouts: "
        + "; ".join(LAYOUTS)
    )


def detect(shapes: Mapping[str, tuple[int, ...]], *, path: str = "weights") -> ArchSpec:
    """Find the architecture of an (unwrapped) state dict given as `name -> shape`.

    Raises `ModelError` naming the understood layouts when nothing matches.
    """
    keys = set(shapes)
    for arch in ARCHITECTURES:
        layout = arch.match(keys)
        if layout is not None:
            try:
                return arch.detect(shapes, layout)
            except LayoutMismatch as exc:
                raise _fail(path, exc.why) from None
    sample = ", ".join(sorted(keys)[:4]) or "no tensors"
    raise _fail(path, f"unrecognised keys: {sample}")


# --- torch-free checks (recipe validation) ----------------------------------------------------


class _Shape(tuple):
    """A tensor seen by `_TensorShapes`: only its shape."""


def _rebuild_tensor(storage, offset, size, *rest):  # noqa: ANN001 - pickle callback
    return _Shape(tuple(size))


def _rebuild_parameter(data, *rest):  # noqa: ANN001 - pickle callback
    return data


class _TensorShapes:
    """Read a PyTorch zip checkpoint's `data.pkl` without torch: tensors become their shapes.

    Only the names a plain state dict needs are allowed (OrderedDict, tensor rebuilds, storage
    types); anything else is refused, so no code in the file runs."""

    ALLOWED = {("collections", "OrderedDict"): dict, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    @classmethod
    def load(cls, data: bytes) -> object:
        import io
        import pickle

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str):  # noqa: ANN201
                if (module, name) in cls.ALLOWED:
                    return cls.ALLOWED[(module, name)]
                if module == "torch" and name.endswith("Storage"):
                    return name
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain state dict")

            def persistent_load(self, pid: object) -> object:
                return pid

        return Unpickler(io.BytesIO(data)).load()


def weight_file_shapes(path: str | Path) -> dict[str, tuple[int, ...]] | None:
    """`name -> shape` of a `.safetensors` file or a PyTorch zip `.pth`, read without torch and
    without running code; None for an old-style (non-zip) pickle, which only loading can check.

    Raises ModelError for a file that is neither."""
    import pickle
    import zipfile

    from imagegen.modelfiles import read_safetensors_shapes

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        return read_safetensors_shapes(p)
    if p.suffix.lower() not in (".pth", ".pt"):
        raise ModelError(f"{p}: an upscaler must be a .pth, .pt or .safetensors file")
    if not zipfile.is_zipfile(p):
        return None
    try:
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                raise ModelError(f"{p}: a zip file without data.pkl: not a PyTorch checkpoint")
            state = _TensorShapes.load(z.read(name))
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"{p}: cannot read weight file ({exc})") from None
    if not isinstance(state, Mapping):
        raise ModelError(f"{p}: weight file holds a {type(state).__name__}, expected a state dict")
    state = unwrap(state)
    return {k: tuple(v) for k, v in state.items() if isinstance(v, _Shape)}


def check_weight_file(path: str | Path) -> ArchSpec | None:
    """The architecture of an upscaler weight file, found from its header without torch (None when
    only loading can tell: an old-style pickle). Raises ModelError for an unsupported file."""
    shapes = weight_file_shapes(path)
    return None if shapes is None else detect(shapes, path=str(path))
