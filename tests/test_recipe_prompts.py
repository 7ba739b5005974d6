"""Recipe keys for A1111 prompt text: prompt_syntax, emphasis, embeddings, lora_dir and
`<lora:name:w>` tags (validate errors with lines, sweeps through variants)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from imagegen.errors import RecipeError
from imagegen.plan import plan
from imagegen.recipe import load_recipe


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel:\n  checkpoint: builtin:tiny-sd15\n" + textwrap.dedent(body).lstrip("\n"))
    return p


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return exc.value.problems


@pytest.fixture
def lora_dir(tmp_path):
    pytest.importorskip("torch")
    from engine_fixtures import make_tiny_lora

    d = tmp_path / "loras"
    d.mkdir()
    make_tiny_lora(d / "gold.safetensors", "sd15", seed=1)
    (d / "sub").mkdir()
    make_tiny_lora(d / "sub" / "silver.safetensors", "sd15", seed=2)
    return d


def test_lora_tags_become_the_jobs_lora_stack_and_sweep(tmp_path, lora_dir):
    r = load_recipe(write(tmp_path, """
        lora_dir: loras
        prompt: "a cup {<lora:gold:0.7>|<lora:silver:0.5>|plain}, studio"
        seeds: 2
    """))
    jobs = plan(r)
    assert [j.prompt for j in jobs[::2]] == ["a cup , studio", "a cup , studio", "a cup plain, studio"]
    assert [[(lu.name, lu.weight) for lu in j.loras] for j in jobs[::2]] == [[("gold", 0.7)], [("silver", 0.5)], []]
    assert jobs[2].loras[0].path == str(lora_dir / "sub" / "silver.safetensors")
    assert len({j.group_key for j in jobs}) == 3 and len({j.id for j in jobs}) == 6


def test_lora_tag_problems_name_the_line(tmp_path, lora_dir):
    p = write(tmp_path, """
        lora_dir: loras
        loras:
          - {path: loras/gold.safetensors, weight: 1}
        prompts:
          - "a <lora:bronze:1>"
          - "b <lora:gold:0.5>"
          - "c <hypernet:x:1>"
        negative: "ugly <lora:gold:1>"
    """)
    got = problems(p)
    assert any(m.startswith(f"{p}:8:5: `<lora:bronze:1>`: no `bronze.safetensors`") for m in got), got
    assert any(m.startswith(f"{p}:9:5: LoRA `gold` is given twice") for m in got), got
    assert any(m.startswith(f"{p}:10:5:") and "only `<lora" in m for m in got), got
    assert any("`negative`" in m or "prompt only" in m for m in got), got
    no_dir = problems(write(tmp_path, 'prompt: "a <lora:gold:1>"\n'))
    assert "needs `lora_dir:`" in no_dir[0]


def test_prompt_syntax_checks(tmp_path, capsys):
    long = ", ".join(["a red vase on a wooden table"] * 12)  # ~96 tokens
    got = problems(write(tmp_path, f"prompt_syntax: plain\nprompt: \"{long}\"\n"))
    assert len(got) == 1 and "CLIP tokens" in got[0] and "allows 75" in got[0] and ":5:9:" in got[0]
    assert load_recipe(write(tmp_path, f"prompt: \"{long}\"\n")).prompt_syntax == "a1111"
    # A1111 accepts unbalanced brackets; it refuses a weight that is not a number
    assert load_recipe(write(tmp_path, 'prompt: "(a cat [on a mat"\n')).prompts[0].text == "(a cat [on a mat"
    assert "not a number" in problems(write(tmp_path, 'prompt: "(a cat:1.2.3)"\n'))[0]
    huge = ", ".join(["a red vase on a wooden table"] * 40)
    r = load_recipe(write(tmp_path, f"prompt: \"{huge}\"\n"))
    assert len(r.notes) == 1 and "chunks of 75 tokens" in r.notes[0] and not r.warnings
    from imagegen.cli import run_app

    assert run_app(["validate", str(tmp_path / "r.yaml")]) == 0
    assert "chunks of 75 tokens" in capsys.readouterr().err
    assert "`emphasis` must be one of" in problems(write(tmp_path, "emphasis: strong\nprompt: a\n"))[0]
    r = load_recipe(write(tmp_path, "emphasis: no-norm\nprompt: a (cat)\n"))
    [job] = plan(r)
    assert job.emphasis == "no-norm" and job.content()["emphasis"] == "no-norm"
    # defaults keep the job content (and ids) of earlier versions
    [plain_job] = plan(load_recipe(write(tmp_path, "prompt: a (cat)\n")))
    assert "emphasis" not in plain_job.content() and "prompt_syntax" not in plain_job.content()


def test_embeddings_key_records_the_files_a_prompt_uses(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    d = tmp_path / "emb"
    d.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(d / "shiny-thing.safetensors"))
    save_file({"emb_params": torch.randn(1, 32)}, str(d / "dull.safetensors"))
    r = load_recipe(write(tmp_path, """
        embeddings: emb
        prompt: "{a shiny-thing cup|a cup}"
        negative: "dull, blurry"
    """))
    assert sorted(Path(e).name for e in r.embeddings) == ["dull.safetensors", "shiny-thing.safetensors"]
    a, b = plan(r)
    assert [Path(e).name for e in a.embeddings] == ["dull.safetensors", "shiny-thing.safetensors"]
    assert [Path(e).name for e in b.embeddings] == ["dull.safetensors"]
    assert "not found" in problems(write(tmp_path, "embeddings: [nope.pt]\nprompt: a\n"))[0]
