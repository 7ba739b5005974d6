"""Shared test setup: every test session gets its own model cache, and nothing goes online."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Built-in tiny models are built once per test session into a private cache folder."""
    cache = os.environ.get("IMAGEGEN_TEST_CACHE") or str(tmp_path_factory.mktemp("imagegen-cache"))
    old = {k: os.environ.get(k) for k in ("IMAGEGEN_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "IMAGEGEN_DEFAULTS")}
    os.environ["IMAGEGEN_CACHE"] = cache
    os.environ["IMAGEGEN_DEFAULTS"] = os.path.join(cache, "no-defaults.yaml")  # never the developer's own file
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = os.path.join(cache, "hf-home-unused")
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core CI box the spinning
    OpenMP workers make engine tests several times slower. Restored after the module."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# One engine per built-in model per test module (module scope, as each file had it): the engine
# tests of several files share these instead of each defining its own copies.
def _cpu_engine(name: str):
    from imagegen.engine import open_engine

    return open_engine(name, device="cpu")


@pytest.fixture(scope="module")
def sd15():
    """builtin:tiny-sd15 on the CPU."""
    return _cpu_engine("builtin:tiny-sd15")


@pytest.fixture(scope="module")
def sdxl():
    """builtin:tiny-sdxl on the CPU."""
    return _cpu_engine("builtin:tiny-sdxl")


@pytest.fixture(scope="module")
def demo():
    """builtin:demo-sd15 (the trained demo model) on the CPU."""
    return _cpu_engine("builtin:demo-sd15")
