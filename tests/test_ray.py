"""Rendering on a Ray cluster (`render --ray`): a local Ray with 2 CPUs and 2 CPU actors stands in
for a cluster of GPU nodes. The same pixels as one process, nothing written twice when an actor
is killed mid-run, files that differ from the driver's refused with one line naming the node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagegen.clusterconfig import ClusterConfig, load_cluster_config, map_path
from imagegen.errors import InputError
from imagegen.recipe import load_recipe
from imagegen.render import RenderOptions, render_recipe
from imagegen.render.ray_driver import import_ray, plan_actors, ray_installed, render_with_ray
from imagegen.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

RECIPE = """
name: ray
model:
  checkpoint: builtin:tiny-sd15
prompts:
  - "a {red|blue|green} cup"
seeds: [10, 11, 12, 13, 14, 15, 16, 17]
size: 64x64
steps: 3
batch_size: 1
loras:
  - {path: loras/style.safetensors, weight: 0.5}
init_image: photos/a.png
denoise: 0.7
output: run
"""


# --- without a cluster: config, planning, refusals -------------------------------------------


def test_map_path_replaces_the_longest_whole_component_prefix():
    mapping = {"/home/a/sd": "/srv/sd", "/home/a/sd/loras": "/data/loras"}
    assert map_path("/home/a/sd/model.safetensors", mapping) == "/srv/sd/model.safetensors"
    assert map_path("/home/a/sd/loras/x.safetensors", mapping) == "/data/loras/x.safetensors"
    assert map_path("/home/a/sdxl/m.safetensors", mapping) == "/home/a/sdxl/m.safetensors"  # not a whole component
    assert map_path("/home/a/sd", mapping) == "/srv/sd"
    assert map_path("builtin:tiny-sd15", mapping) == "builtin:tiny-sd15"


def test_cluster_config_format_and_its_errors(tmp_path):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("models:\n  /home/a/sd: /srv/sd\nnodes:\n  gpu-2:\n    models:\n      /home/a/sd: /data/sd\n  ws: {}\n")
    c = load_cluster_config(cfg)
    assert c.mapping_for("gpu-3", "ws") == {"/home/a/sd": "/srv/sd"}
    assert c.mapping_for("gpu-2", "ws") == {"/home/a/sd": "/data/sd"}
    assert c.mapping_for("ws", "ws") == {}  # named: as written; the driver's own machine: its paths anyway
    assert ClusterConfig(models={"/a": "/b"}).mapping_for("ws", "ws") == {}
    for text, message in (("model:\n  /a: /b\n", "unknown key `model`; did you mean `models`"),
                          ("models:\n  a: /b\n", "'a' is not an absolute path"),
                          ("nodes:\n  n1:\n    paths: {}\n", "unknown key `nodes.n1.paths`"),
                          ("models: [1\n", "cluster.yaml:2:1: not valid YAML")):
        cfg.write_text(text)
        with pytest.raises(InputError, match=message.replace("[", r"\[")):
            load_cluster_config(cfg)
    with pytest.raises(InputError, match="cluster config not found"):
        load_cluster_config(tmp_path / "nope.yaml")


def test_an_actor_reads_photos_and_model_files_from_its_nodes_paths(tmp_path):
    from photo_fixtures import product_photo

    from imagegen.engine import GenRequest, HiresRequest
    from imagegen.engine.controlnet import ControlRequest
    from imagegen.plan import plan
    from imagegen.render.ray_actor import NodeEngine, NodePhotos, input_hashes

    (tmp_path / "photos").mkdir()
    product_photo((32, 32))[0].save(tmp_path / "photos" / "a.png")
    (tmp_path / "r.yaml").write_text("name: p\nmodel:\n  checkpoint: builtin:tiny-sd15\nprompt: a cup\nsize: 32x32\n"
                                     "steps: 2\ninit_image: photos/a.png\ndenoise: 0.5\noutput: run\n")
    job = plan(load_recipe(tmp_path / "r.yaml"))[0]
    mapping = {str(tmp_path / "photos"): "/node/pics", "/models": "/srv/models"}
    local = lambda p: map_path(p, mapping)  # noqa: E731
    assert NodePhotos(local)._mapped(job).input.photo == "/node/pics/a.png"
    assert input_hashes([job]) == {str(tmp_path / "photos" / "a.png"): job.input.photo_sha256}

    class Seen:  # records what the engine was asked for
        model_name, asked = "m", []

        def set_loras(self, loras):
            self.asked.append(loras)

        def generate(self, requests):
            self.asked.append(requests)

    inner = Seen()
    engine = NodeEngine(inner, local, "/models/sd/m.safetensors")
    engine.set_loras([("/models/l.safetensors", 0.5)])
    engine.generate([GenRequest("a", "", 1, 32, 32, 2, 5.0, "Euler", hires=HiresRequest(64, 64, "/models/x4.pth", 0.5, 2, "Euler"),
                                controlnet=(ControlRequest("/models/cn.safetensors", None),))])
    assert inner.asked[0] == [("/srv/models/l.safetensors", 0.5)]
    r = inner.asked[1][0]
    assert (r.hires.upscaler, r.controlnet[0].model) == ("/srv/models/x4.pth", "/srv/models/cn.safetensors")
    assert engine.model_name == "m"  # the driver's name (the file's stem), wherever the node keeps it


def test_actor_plans():
    assert plan_actors({"GPU": 3, "CPU": 24}, 2, None, None).count == 3
    cpu = plan_actors({"CPU": 2}, 1, "cpu", 2)
    assert (cpu.count, cpu.cpus, cpu.gpus, cpu.device) == (2, 1, 0, "cpu")
    with pytest.raises(InputError, match="no GPU.*--device cpu --ray-actors N"):
        plan_actors({"CPU": 2}, 1, None, None)
    with pytest.raises(InputError, match="has 2 GPUs"):
        plan_actors({"GPU": 2, "CPU": 8}, 1, "cuda", 3)


def test_why_an_actor_stopped_reads_in_a_few_words():
    from imagegen.render.ray_driver import _init_failure, _ray_reason

    died = RuntimeError("The actor died unexpectedly before finishing this task. class_name: RenderActor "
                        "The actor died because its node has died. Node Id: 1f2e")
    assert _ray_reason(died) == "its node has died"
    not_there = RuntimeError("The actor died because of an error raised in its creation task, ray::r0 (pid=5, "
                             "ip=10.0.0.7, actor_id=ab)\n  File x\nModuleNotFoundError: No module named 'imagegen'")
    line = _init_failure(not_there)
    assert line.startswith("node 10.0.0.7: the imagegen actor cannot start (ModuleNotFoundError: No module named")
    assert "\n" not in line and "install imagegen" in line


def test_combinations_that_do_not_work_are_refused_with_one_line(tmp_path, capsys):
    from imagegen.cli import run_app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: w\nmodel:\n  checkpoint: builtin:tiny-sd15\nprompt: a cup\nsize: 64x64\nsteps: 2\noutput: run\n")
    bad_cfg = tmp_path / "cluster.yaml"
    bad_cfg.write_text("modles: {}\n")
    cases = (
        (["--ray", "auto", "--workers", "2"], "`--ray` and `--workers`/`--gpus`: give one"),
        (["--ray-actors", "2"], "go with `--ray auto|HOST:PORT`"),
        (["--ray", "auto", "--max-hours", "1"], "not supported with `--ray` yet"),
        (["--ray", "auto", "--compile"], "not supported with `--ray` yet"),
        (["--ray", "auto", "--device", "cuda:1"], "`--device cuda:1` with `--ray`"),
        (["--ray", "auto", "--ray-config", str(bad_cfg)], "unknown key `modles`"),
    )
    for extra, message in cases:
        assert run_app(["render", str(recipe), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (extra, err)
    assert not (tmp_path / "run").exists()
    compiled = tmp_path / "c.yaml"
    compiled.write_text(recipe.read_text().replace("output: run", "output: run-c\nrender:\n  compile: true"))
    assert run_app(["render", str(compiled), "--ray", "auto", "--no-sheet"]) == 2
    assert "not with `--ray` yet: pass --no-compile" in capsys.readouterr().err


def test_help_validate_and_plan_never_import_ray():
    code = textwrap.dedent(f"""
        import sys
        from imagegen.cli import run_app
        for argv in (["--help"], ["render", "--help"], ["validate", r"{ROOT / 'recipes' / 'example.yaml'}"],
                     ["plan", r"{ROOT / 'recipes' / 'example.yaml'}"]):
            try:
                run_app(argv)
            except SystemExit:
                pass
        print("RAY", "ray" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "RAY False" in out


# --- on a local Ray cluster -------------------------------------------------------------------

needs_ray = pytest.mark.skipif(not ray_installed(), reason="ray is not installed (pip install 'imagegen[ray]')")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module: 2 CPUs, so 2 CPU actors at most (the CI box has 2 cores)."""
    if not ray_installed():
        pytest.skip("ray is not installed (pip install 'imagegen[ray]')")
    ray = import_ray()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="imagegen")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The recipe (24 img2img jobs from one photo, one LoRA) and its images from a one-process render."""
    from engine_fixtures import make_tiny_lora
    from photo_fixtures import product_photo

    import torch

    folder = tmp_path_factory.mktemp("ray")
    (folder / "loras").mkdir()
    make_tiny_lora(folder / "loras" / "style.safetensors", "sd15", seed=3)
    (folder / "photos").mkdir()
    product_photo((64, 64))[0].save(folder / "photos" / "a.png")
    path = folder / "r.yaml"
    path.write_text(textwrap.dedent(RECIPE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each CPU actor (one CPU each)
    try:
        with RunStore.open(folder / "one") as store:
            render_recipe(load_recipe(path), store, options=RenderOptions(device="cpu", batch_size=1))
    finally:
        torch.set_num_threads(threads)
    return path, images_of(folder / "one")


def images_of(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted((run / "images").glob("*.png")):
        with Image.open(p) as im:
            out[p.stem.split("-")[0]] = np.asarray(im.convert("RGB"))  # by index: a copied recipe has other ids
    return out


def image_events(run: Path) -> Counter:
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return Counter(e["id"] for e in events if e["event"] == "image")


def assert_same_images(run: Path, reference: dict[str, np.ndarray]) -> None:
    got = images_of(run)
    assert got.keys() == reference.keys()
    for index, pixels in reference.items():  # one code path (batch 1, one thread) in both: exact
        np.testing.assert_array_equal(got[index], pixels)


@needs_ray
def test_two_ray_actors_render_the_same_pixels_as_one_process(cluster, work, tmp_path):
    path, reference = work
    node = tmp_path / "node"  # this node keeps the LoRA and the photo elsewhere: the mapping finds them
    shutil.copytree(path.parent / "loras", node / "loras")
    shutil.copytree(path.parent / "photos", node / "pictures")
    config = ClusterConfig(nodes={HOST: {str(path.parent / "loras"): str(node / "loras"),
                                         str(path.parent / "photos"): str(node / "pictures")}})
    events: list[dict] = []
    with RunStore.open(tmp_path / "run") as store:
        summary = render_with_ray(load_recipe(path), store, actors=2, config=config, on_event=events.append,
                                  options=RenderOptions(device="cpu", batch_size=1))
        workers = store.status()["workers"]
        assert store.counts()["done"] == 24
        assert store.queued() == {"waiting": 0, "claimed": 0}
    assert (summary.rendered, summary.failed, summary.left) == (24, 0, 0)
    assert_same_images(tmp_path / "run", reference)
    assert set(image_events(tmp_path / "run").values()) == {1} and len(image_events(tmp_path / "run")) == 24
    assert sorted(w["name"] for w in workers) == ["r0", "r1"]
    assert all(w["host"] == HOST and w["state"] == "stopped" for w in workers)
    assert sum(w["rendered"] for w in workers) == 24
    kinds = [e["event"] for e in events]
    assert kinds.count("loaded") == 1 and kinds.count("cluster") == 1 and kinds[-1] == "finish"
    with Image.open(next((tmp_path / "run" / "images").glob("*.png"))) as im:  # the driver's paths in the metadata
        prov = json.loads(im.text["imagegen"])
    assert prov["loras"][0]["path"] == str(path.parent / "loras" / "style.safetensors")
    assert prov["input"]["photo"] == str(path.parent / "photos" / "a.png")
    assert (tmp_path / "run" / "thumbs" / "inputs").is_dir()  # the photo beside its renders on the sheets


@needs_ray
@pytest.mark.slow
def test_killing_an_actor_mid_run_completes_without_duplicates(cluster, work, tmp_path):
    path, reference = work
    names: dict[str, str] = {}
    killed: list[str] = []
    events: list[dict] = []

    def on_event(e: dict) -> None:
        events.append(e)
        if e["event"] in ("loaded", "worker_loaded"):
            names[e["worker"]] = e["actor"]
        if e["event"] == "image" and e["worker"] == "r1" and not killed:
            killed.append("r1")
            cluster.kill(cluster.get_actor(names["r1"], namespace="imagegen"), no_restart=True)

    with RunStore.open(tmp_path / "run") as store:
        summary = render_with_ray(load_recipe(path), store, actors=2, on_event=on_event,
                                  options=RenderOptions(device="cpu", batch_size=1))
        assert store.counts()["done"] == 24
    assert killed == ["r1"]
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert [e["worker"] for e in lost] == ["r1"] and "starting r2 in its place" in lost[0]["message"]
    assert (summary.rendered, summary.left) == (24, 0) and events[-1]["lost"] == ["r1"]
    counts = image_events(tmp_path / "run")
    assert len(counts) == 24 and set(counts.values()) == {1}  # every job once
    assert_same_images(tmp_path / "run", reference)


@needs_ray
def test_a_node_file_that_differs_from_the_drivers_is_refused_with_one_line(cluster, work, tmp_path, capsys):
    from engine_fixtures import make_tiny_lora

    from imagegen.cli import run_app

    path, _ = work
    other = tmp_path / "other-loras"
    other.mkdir()
    make_tiny_lora(other / "style.safetensors", "sd15", seed=4)  # same name, other weights
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(f"nodes:\n  {HOST}:\n    models:\n      {path.parent / 'loras'}: {other}\n")
    argv = ["render", str(path), "--ray", "auto", "--device", "cpu", "--ray-actors", "2", "--ray-config", str(cfg),
            "--no-sheet", "--output", str(tmp_path / "run")]
    assert run_app(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"node {HOST}: {other / 'style.safetensors'} (the driver's {path.parent / 'loras'}")
    assert "differs from the driver's" in err[-1]
    assert sum("sha256" in line for line in err) == 1, err  # one line, though both actors refused
    (other / "style.safetensors").unlink()
    assert run_app(argv) == 2
    assert "is missing; place the driver's file there" in capsys.readouterr().err.strip().splitlines()[-1]
    with RunStore.open(tmp_path / "run") as store:
        assert store.counts()["done"] == 0 and store.queued() == {"waiting": 0, "claimed": 0}


@needs_ray
@pytest.mark.slow
def test_a_killed_driver_resumes_from_the_manifest(cluster, work, tmp_path):
    """kill -9 of the driver: its actors die with it; `render --ray` again finishes the run."""
    path, reference = work
    recipe = tmp_path / "r.yaml"
    shutil.copytree(path.parent / "loras", tmp_path / "loras")
    shutil.copytree(path.parent / "photos", tmp_path / "photos")
    recipe.write_text(path.read_text())
    cmd = [sys.executable, "-m", "imagegen", "render", str(recipe), "--ray", "auto", "--device", "cpu", "--ray-actors", "2",
           "--json", "--no-sheet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    for line in proc.stdout:
        if json.loads(line)["event"] == "image":
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    finish = json.loads(again.stdout.splitlines()[-1])
    assert finish["event"] == "finish" and finish["left"] == 0 and finish["already_done"] >= 1
    with RunStore.open(tmp_path / "run") as store:
        assert store.counts()["done"] == 24
    assert set(image_events(tmp_path / "run").values()) == {1}  # nothing written twice
    assert_same_images(tmp_path / "run", reference)
