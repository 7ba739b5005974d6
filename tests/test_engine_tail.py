"""The host tail (engine/tail.py): uint8 on the device gives exactly the pixels of diffusers'
numpy path on CPU, NaN images become error results, and a real batch equals the plain pipeline."""

from __future__ import annotations

import numpy as np
import pytest

from imagegen.engine import GenRequest, GenResult, open_engine
from imagegen.engine.tail import results, to_host_uint8

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")


def _numpy_path(t):
    """What the engine did before: diffusers' numpy output, then (x * 255).round() on the host."""
    arr = t.cpu().permute(0, 2, 3, 1).float().numpy()
    return (arr * 255).round().astype("uint8")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_device_uint8_equals_the_numpy_path(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand((3, 3, 17, 23), generator=g)
    x[0, :, :4] = torch.arange(4 * 23 * 3, dtype=torch.float32).reshape(3, 4, 23) % 256 / 255  # exact levels
    x[1, 0, 0, :6] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255, 0.0, 1.0, 254.5 / 255])  # .5 boundaries
    x = x.to(dtype)
    u8, finite = to_host_uint8(x)
    assert u8.dtype == np.uint8 and u8.shape == (3, 17, 23, 3) and finite == [True] * 3
    np.testing.assert_array_equal(u8, _numpy_path(x))


def test_nan_image_is_an_error_result_and_the_others_are_kept():
    x = torch.rand((3, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    x[1, 2, 3, 4] = float("nan")
    out = results(x, None, GenResult)
    assert out[1].image is None and out[1].error == "NaN in output"
    np.testing.assert_array_equal(np.asarray(out[0].image), _numpy_path(x)[0])
    np.testing.assert_array_equal(np.asarray(out[2].image), _numpy_path(x)[2])


def test_generate_equals_the_plain_pipelines_numpy_output():
    eng = open_engine("builtin:tiny-sd15", device="cpu")
    reqs = [GenRequest("a cat", "", 5, 64, 64, 3, 5.0, "Euler a"), GenRequest("a dog", "", 6, 64, 64, 3, 5.0, "Euler a")]
    got = [np.asarray(r.image) for r in eng.generate(reqs)]
    pipe = eng.pipeline
    pipe.scheduler = eng._make_scheduler("Euler a")
    with torch.no_grad():
        plain = pipe(["a cat", "a dog"], width=64, height=64, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                     generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)]).images
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, (b * 255).round().astype("uint8"))
