"""A1111 infotext in and out, and the model-hash cache."""

from __future__ import annotations

import os

from imagegen.metadata import a1111_quote, file_sha256, format_parameters, parse_parameters, sha256_file


def test_infotext_layout_matches_a1111():
    text = format_parameters(
        prompt="a red vase, studio", negative="blurry", steps=30, scheduler="DPM++ 2M Karras", guidance=6.5, seed=1234,
        width=1024, height=1024, model_name="sd_xl_base_1.0", model_hash="31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
        loras=[("style", 0.8, "0123456789abcdef0000"), ("grain", 0.3, None)], clip_skip=2, version="imagegen 0.1.0",
    )
    assert text.splitlines() == [
        "a red vase, studio <lora:style:0.8> <lora:grain:0.3>",
        "Negative prompt: blurry",
        'Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 1024x1024, '
        'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, Lora hashes: "style: 0123456789ab", Version: imagegen 0.1.0',
    ]


def test_round_trip_with_quoting_and_no_negative():
    text = format_parameters(prompt="line one\nline two", negative="", steps=4, scheduler="Euler a", guidance=7, seed=5,
                             width=64, height=64, model_name="my:model, v2")
    assert "Negative prompt" not in text
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "line one\nline two" and parsed["negative"] == ""
    assert parsed["Model"] == "my:model, v2" and parsed["scheduler"] == "Euler a" and parsed["Seed"] == "5"
    assert a1111_quote("plain") == "plain" and a1111_quote('a "b"') == '"a \\"b\\""'


def test_file_hash_is_cached_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(4096))
    first = sha256_file(f)
    assert first == file_sha256(f) and (tmp_path / "cache" / "file-hashes.json").exists()
    assert sha256_file(f) == first
    f.write_bytes(os.urandom(4097))
    assert sha256_file(f) == file_sha256(f) != first
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"1")
    a = sha256_file(folder)
    (folder / "unet" / "w.bin").write_bytes(b"22")
    assert sha256_file(folder) != a


def test_addnet_hash_skips_the_header_and_prefers_kohya_metadata(tmp_path, monkeypatch):
    import hashlib
    import struct

    torch = __import__("pytest").importorskip("torch")
    from safetensors.torch import save_file

    from imagegen.metadata import addnet_hash, addnet_hash_of_file

    monkeypatch.setenv("IMAGEGEN_CACHE", str(tmp_path / "cache"))
    plain = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(plain), metadata={"ss_network_dim": "4"})
    data = plain.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert addnet_hash(plain) == addnet_hash_of_file(plain) == hashlib.sha256(data[8 + n:]).hexdigest()
    # the same tensors with other metadata: same AddNet hash, other file hash
    other = tmp_path / "b.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(other), metadata={"ss_network_dim": "8"})
    assert addnet_hash(other) == addnet_hash(plain) and file_sha256(other) != file_sha256(plain)
    kohya = tmp_path / "k.safetensors"
    save_file({"w": torch.ones(1)}, str(kohya), metadata={"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert addnet_hash(kohya) == ("abcdef0123456789" * 4)


def test_schedule_type_is_explicit_where_a1111_default_differs():
    from imagegen.samplers import from_infotext

    def line(scheduler):
        return format_parameters(prompt="p", negative="", steps=4, scheduler=scheduler, guidance=7, seed=1, width=64,
                                 height=64, model_name="m").splitlines()[-1]

    for name in ("DPM++ 2M", "DPM++ SDE", "DPM2", "DPM2 a", "DPM++ 2M SDE"):
        assert "Schedule type: Uniform" in line(name), name
        assert parse_parameters(line(name).join(["p\n", ""]))["scheduler"] == name
    for name in ("Euler", "Euler a", "DDIM", "UniPC"):
        assert "Schedule type" not in line(name)
    assert "Schedule type: Karras" in line("DPM++ 2M Karras")
    # how A1111 >= 1.9 reads a missing schedule (files from A1111 itself)
    assert from_infotext("DPM++ 2M", "").name == "DPM++ 2M Karras"
    assert from_infotext("DPM++ 2M", "Automatic").name == "DPM++ 2M Karras"
    assert from_infotext("DPM++ 2M", "Uniform").name == "DPM++ 2M"
    assert from_infotext("DPM++ 2M", "", a1111_defaults=False).name == "DPM++ 2M"
    assert from_infotext("Euler a", "").name == "Euler a"
    assert parse_parameters("p\nSteps: 4, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1")["scheduler"] == "DPM++ 2M Karras"


def test_provenance_chunk_is_strict_json():
    import json

    from imagegen.metadata import strict_json

    def refuse(name):
        raise ValueError(name)

    text = strict_json({"a": float("-inf"), "b": [float("inf"), float("nan"), 1.5], "c": {"d": (1, 2)}})
    assert json.loads(text, parse_constant=refuse) == {"a": "-Infinity", "b": ["Infinity", "NaN", 1.5], "c": {"d": [1, 2]}}
