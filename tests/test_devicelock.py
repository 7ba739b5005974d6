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
