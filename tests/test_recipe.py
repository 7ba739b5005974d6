import textwrap
from pathlib import Path

import pytest

from imagegen.errors import RecipeError
from imagegen.plan import count_jobs, plan
from imagegen.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


MINIMAL = """
name: t
model:
  checkpoint: builtin:tiny-sd15
prompt: a cat
"""


def problems(path: Path, **kw) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, **kw)
    return exc.value.problems


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert r.name == "t" and r.family == "sd15"
    assert r.seeds == (0,) and r.sizes == ((64, 64),) and r.steps == (25,)
    assert r.schedulers == ("DPM++ 2M Karras",) and r.guidance == (7.0,) and r.batch_size == 4
    assert r.output == Path("runs") / "t"
    assert [p.text for p in r.prompts] == ["a cat"]


def test_shipped_recipes_validate_and_plan():
    ex = load_recipe(ROOT / "recipes" / "example.yaml")
    assert count_jobs(ex) == 48
    packshot = ROOT / "recipes" / "sdxl-packshot.yaml"
    r = load_recipe(packshot, check_files=False)
    assert count_jobs(r) == 1000 and len(plan(r)) == 1000
    assert len(r.warnings) == 5  # checkpoint, two LoRAs, upscaler (for upscale: and hires:): the user's own files
    missing = problems(packshot)
    assert len(missing) == 5 and all("not found" in m for m in missing)
    assert missing[0].startswith(f"{packshot}:9:15: checkpoint file not found")


@pytest.mark.parametrize(
    "seeds, expected",
    [
        ("3", (0, 1, 2)),
        ("[5, 9, 2]", (5, 9, 2)),
        ("{start: 100, count: 3}", (100, 101, 102)),
        ('"1000-1002"', (1000, 1001, 1002)),
    ],
)
def test_seed_forms(tmp_path, seeds, expected):
    assert load_recipe(write(tmp_path, MINIMAL + f"seeds: {seeds}\n")).seeds == expected


@pytest.mark.parametrize(
    "extra, line, words",
    [
        ('seeds: "10-5"\n', 5, "ends before it starts"),
        ("seeds: 0\n", 5, "at least 1"),
        ("seeds: [1, 1]\n", 5, "listed twice"),
        ("seeds: {start: 1}\n", 5, "seeds.count"),
        ("seeds: abc\n", 5, "must be a count"),
        ("size: 500x512\n", 5, "multiple of 8"),
        ("size: big\n", 5, "must look like"),
        ("size: []\n", 5, "empty list"),
        ("steps: 0\n", 5, "`steps` must be a whole number"),
        ("steps: [10, 10]\n", 5, "twice"),
        ("batch_size: 0\n", 5, "batch_size"),
        ("guidance: high\n", 5, "guidance"),
        ("scheduler: Eulr a\n", 5, 'did you mean "Euler a"'),
        ("clip_skip: 0\n", 5, "clip_skip"),
        ("max_jobs: -1\n", 5, "max_jobs"),
        ("negative: [a]\n", 5, "`negative` must be text"),
        ("wildcards: nowhere\n", 5, "wildcards folder not found"),
        ("upscale: {scale: 2, width: 100}\n", 5, "give one of"),
        ("upscale: {format: webp}\n", 5, "upscale.format"),
        ("sample: 2\n", 4, "more variants than the template has"),
    ],
)
def test_bad_values_name_file_line_and_key(tmp_path, extra, line, words):
    path = write(tmp_path, MINIMAL + extra)
    found = problems(path)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line}:"), found
    assert words in found[0]


def test_unknown_keys_at_any_depth_suggest_nearest(tmp_path):
    path = write(tmp_path, """
        name: t
        model:
          checkpoint: builtin:tiny-sd15
          famly: sd15
        prompt: a cat
        upscale:
          modle: x.pth
        stepps: 3
        """)
    found = problems(path)
    assert f"{path}:4:3: unknown key `model.famly`; did you mean `family`?" in found
    assert f"{path}:7:3: unknown key `upscale.modle`; did you mean `model`?" in found
    assert f"{path}:8:1: unknown key `stepps`; did you mean `steps`?" in found


def test_all_missing_files_reported_at_once(tmp_path):
    path = write(tmp_path, """
        name: t
        model:
          checkpoint: m/base.safetensors
          family: sdxl
          vae: m/vae.safetensors
        loras:
          - {path: l/a.safetensors, weight: 0.5}
          - {path: l/b.safetensors, weight: [0.1, 0.2]}
        prompt: a cat
        upscale: {model: m/x4.pth}
        """)
    found = problems(path)
    assert len(found) == 5
    assert all("not found" in f for f in found)
    assert found[0].startswith(f"{path}:3:15:")


def test_family_mismatch_with_builtin_and_unknown_builtin(tmp_path):
    found = problems(write(tmp_path, MINIMAL.replace("tiny-sd15", "tiny-sd15\n  family: sdxl")))
    assert "`model.family` is sdxl but `builtin:tiny-sd15` is sd15" in found[0]
    found = problems(write(tmp_path, MINIMAL.replace("tiny-sd15", "tiny-sd99")))
    assert "unknown built-in model `builtin:tiny-sd99`" in found[0] and "builtin:tiny-sdxl" in found[0]


def test_family_and_default_size_come_from_the_checkpoint_keys(tmp_path):
    from engine_fixtures import fake_checkpoint_shapes, write_fake_safetensors

    write_fake_safetensors(tmp_path / "xl.safetensors", fake_checkpoint_shapes("sdxl"))
    r = load_recipe(write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "xl.safetensors")))
    assert r.family == "sdxl" and r.sizes == ((1024, 1024),)
    assert r.checkpoint == str((tmp_path / "xl.safetensors").resolve())
    path = write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "xl.safetensors\n  family: sd15"))
    assert "`model.family` is sd15 but `xl.safetensors` is sdxl" in problems(path)[0]
    write_fake_safetensors(tmp_path / "inpaint.safetensors", fake_checkpoint_shapes("inpaint"))
    found = problems(write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "inpaint.safetensors") + "size: 512x512\n"))
    assert found[0].startswith(f"{tmp_path / 'r.yaml'}:3:15:") and "inpaint" in found[0].lower()
    (tmp_path / "junk.safetensors").write_bytes(b"x")
    assert "junk.safetensors" in problems(write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "junk.safetensors")))[0]
    # plan (files not checked) cannot read the family: then `size` is needed
    path = write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "missing.safetensors"))
    assert any("`size` is needed" in p for p in problems(path, check_files=False))


def test_job_cap_states_count_and_axes(tmp_path):
    path = write(tmp_path, MINIMAL.replace("a cat", "a {cat|dog}") + "seeds: 30\nsteps: [5, 6, 7]\nmax_jobs: 100\n")
    found = problems(path)
    assert "180 jobs (3 step counts x 2 prompt variants x 30 seeds)" in found[0]
    assert found[0].startswith(f"{path}:7:")


def test_prompt_errors_point_at_template(tmp_path):
    path = write(tmp_path, MINIMAL.replace("prompt: a cat", "prompts:\n  - ok\n  - 'a {b|c'"))
    found = problems(path)
    assert found[0].startswith(f"{path}:6:5:") and "unbalanced `{`" in found[0] and "column 3" in found[0]


def test_duplicate_variants_and_keys_are_errors(tmp_path):
    found = problems(write(tmp_path, MINIMAL.replace("a cat", "'{a|a} cat'")))
    assert "appears twice" in found[0]
    found = problems(write(tmp_path, MINIMAL.replace("a cat", "{a|b} cat")))
    assert "YAML syntax error" in found[0] and "must be quoted" in found[0]
    found = problems(write(tmp_path, MINIMAL + "steps: 3\nsteps: 4\n"))
    assert "`steps` is given twice" in found[0]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "the recipe is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: [a\n", "YAML syntax error"),
        ("name: t\n\tmodel: x\n", "YAML syntax error"),
    ],
)
def test_yaml_level_errors(tmp_path, text, words):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    found = problems(path)
    assert words in found[0] and found[0].startswith(str(path))


def test_lora_sweeps_and_sets(tmp_path):
    for n in ("a", "b", "c"):
        (tmp_path / f"{n}.safetensors").write_bytes(b"x")
    path = write(tmp_path, MINIMAL + """
loras:
  - {path: a.safetensors, weight: [0.0, 0.5]}
lora_sets:
  plain:
  styled:
    - {path: b.safetensors, weight: 0.8}
    - {path: c.safetensors, weight: 0.3, name: cee}
seeds: 2
""")
    jobs = plan(load_recipe(path, check_files=False))  # placeholder files: no LoRA family check
    assert len(jobs) == 2 * 2 * 2
    assert [j.lora_set for j in jobs] == ["plain"] * 4 + ["styled"] * 4
    assert [tuple((lu.name, lu.weight) for lu in j.loras) for j in jobs[6:8]] == [(("a", 0.5), ("b", 0.8), ("cee", 0.3))] * 2
    bad = write(tmp_path, MINIMAL + "lora_sets:\n  s:\n    - {path: b.safetensors, weight: [1, 2]}\n", "bad.yaml")
    assert "allowed in `loras`, not inside `lora_sets`" in problems(bad, check_files=False)[0]


def test_huge_seed_ranges_are_refused_before_any_list_is_built(tmp_path):
    found = problems(write(tmp_path, MINIMAL + 'seeds: "0-4294967295"\n'))
    assert found == [f"{tmp_path / 'r.yaml'}:5:8: `seeds` gives 4294967296 seeds, more than `max_jobs: 5000` allows on its own"]
    assert "more than `max_jobs: 5000`" in problems(write(tmp_path, MINIMAL + "seeds: 300000000\n"))[0]


def test_negative_prompt_is_literal_and_variant_syntax_there_is_an_error(tmp_path):
    assert "only expanded in prompts" in problems(write(tmp_path, MINIMAL + 'negative: "{ugly|bad}"\n'))[0]
    assert load_recipe(write(tmp_path, MINIMAL + 'negative: "blurry, (worst quality)"\n')).negative == "blurry, (worst quality)"


def test_identical_lora_sets_are_refused(tmp_path):
    found = problems(write(tmp_path, MINIMAL + "seeds: 2\nlora_sets:\n  plain:\n  none:\n"))
    assert found == [f"{tmp_path / 'r.yaml'}:8:3: LoRA sets `plain` and `none` give the same LoRA stack, so their jobs would be identical; remove one"]


def test_backslash_escapes_in_double_quotes_get_a_hint(tmp_path):
    found = problems(write(tmp_path, MINIMAL.replace("prompt: a cat", 'prompt: "a \\\\{b\\\\} c"'.replace("\\\\", "\\"))))
    assert "YAML syntax error" in found[0] and "use single quotes" in found[0]
    assert [p.text for p in load_recipe(write(tmp_path, MINIMAL.replace("prompt: a cat", r"prompt: 'a \{b\} c'"))).prompts] == ["a {b} c"]


def test_plan_reads_the_family_of_an_existing_file_like_validate(tmp_path):
    from engine_fixtures import fake_checkpoint_shapes, write_fake_safetensors

    write_fake_safetensors(tmp_path / "m.safetensors", fake_checkpoint_shapes("sd15"))
    path = write(tmp_path, MINIMAL.replace("builtin:tiny-sd15", "m.safetensors"))
    assert load_recipe(path).sizes == load_recipe(path, check_files=False).sizes == ((512, 512),)


def test_common_newcomer_mistakes_get_a_hint(tmp_path):
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("name: t\nmodel:\n\tcheckpoint: builtin:tiny-sd15\nprompt: a\n")
    found = problems(tabs)
    assert found[0].startswith(f"{tabs}:3:1: YAML syntax error") and "indent with spaces" in found[0]
    found = problems(write(tmp_path, MINIMAL + "checkpoint: builtin:tiny-sd15\nguidance: 7,5\nsteps: 2,5\n"))
    assert any("unknown key `checkpoint`; it belongs under `model:` (indent it there)" in p for p in found), found
    assert any(":6:11: `guidance` must be a number" in p and "did you mean 7.5?" in p for p in found), found
    # never silently fixed: the hint is in the error, the recipe is still refused
    assert len(found) >= 3
