"""The per-device lock: one renderer per GPU, across processes; re-entrant within one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from imagegen.devicelock import DeviceBusyError, device_key, device_lock


def test_keys_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_key("cpu") is None and device_key("cuda") == "cuda-0" and device_key("cuda:1") == "cuda-1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert device_key("cuda") == "cuda-2" and device_key("cuda:1") == "cuda-3"


HOLDER = textwrap.dedent("""
    import sys, time
    from imagegen.devicelock import device_lock
    with device_lock("cuda:0", holder="imagegen serve queue"):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_a_second_process_is_refused_with_a_clear_message_or_waits(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DeviceBusyError, match=r"device cuda:0 is busy: imagegen serve queue \(PID \d+"):
            with device_lock("cuda:0"):
                pass
        with device_lock("cuda:1"), device_lock("cpu"):  # other devices are free
            pass
        said, got = [], threading.Event()

        def waiter():
            with device_lock("cuda", wait=True, on_wait=said.append):
                got.set()

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(1.5)
        assert not got.is_set() and "waiting for it" in said[0]
        proc.stdin.write("\n")
        proc.stdin.flush()
        t.join(20)
        assert got.is_set()
    finally:
        proc.kill()
        proc.wait()


def test_reentrant_within_a_process(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path))
    with device_lock("cuda:0"):
        with device_lock("cuda:0"):
            pass
        with device_lock("cuda:0"):
            pass


def test_a_plain_render_on_a_busy_gpu_refuses_or_waits(monkeypatch, tmp_path, capsys):
    """The render flow takes the lock of the device it loads onto (a GPU here, faked: this
    machine has none; the engine is the fake one, the lock and the render flow are real)."""
    import imagegen.devices
    import imagegen.engine
    from imagegen.api import load_recipe, render
    from tests.fakes import fake_opener

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(imagegen.devices, "resolve_device", lambda device: "cuda:0")
    monkeypatch.setattr(imagegen.engine, "open_engine", fake_opener())
    recipe = load_recipe({"name": "busy", "model": {"checkpoint": "builtin:tiny-sd15"}, "prompt": "x", "seeds": 2,
                          "size": "64x64", "steps": 2}, base_dir=tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DeviceBusyError, match="device cuda:0 is busy: imagegen serve queue"):
            render(recipe, output=tmp_path / "run", sheets=False)
        recipe_file = tmp_path / "busy.yaml"
        recipe_file.write_text(f"name: busy\nmodel: {{checkpoint: builtin:tiny-sd15}}\nprompt: x\nseeds: 2\n"
                               f"size: 64x64\nsteps: 2\noutput: {tmp_path / 'run'}\n")
        from imagegen.cli import run_app

        assert run_app(["render", str(recipe_file), "--no-sheet"]) == 2
        assert "is busy: imagegen serve queue" in capsys.readouterr().err
        threading.Timer(1.5, lambda: (proc.stdin.write("\n"), proc.stdin.flush())).start()
        assert run_app(["render", str(recipe_file), "--no-sheet", "--wait"]) == 0
        err = capsys.readouterr().err
        assert "waiting for it" in err
    finally:
        proc.kill()
        proc.wait()
    assert len(list((tmp_path / "run" / "images").glob("*.png"))) == 2
