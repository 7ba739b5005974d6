import textwrap
from pathlib import Path

from imagegen.plan import count_jobs, plan
from imagegen.sheets import axis_values
from imagegen.recipe import load_recipe

RECIPE = """
name: p
model:
  checkpoint: builtin:tiny-sd15
prompts:
  - "a {red|blue} cup"
  - a plate
seeds: [7, 8]
steps: [5, 6]
guidance: 3
"""


def load(tmp_path: Path, text: str = RECIPE):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return load_recipe(path)


def test_order_indices_and_axes(tmp_path):
    jobs = plan(load(tmp_path))
    assert len(jobs) == count_jobs(load(tmp_path)) == 2 * 3 * 2
    assert [j.index for j in jobs] == list(range(1, 13))
    # steps outside prompts outside seeds
    assert [(j.steps, j.prompt, j.seed) for j in jobs[:4]] == [
        (5, "a red cup", 7), (5, "a red cup", 8), (5, "a blue cup", 7), (5, "a blue cup", 8)]
    assert jobs[6].steps == 6 and jobs[6].prompt == "a red cup"
    assert dict(jobs[5].axes) == {"size": "64x64", "steps": "5", "scheduler": "DPM++ 2M Karras", "guidance": "3",
                                  "prompt": "#3 a plate", "seed": "8"}
    values = axis_values(jobs)
    assert values["steps"] == ["5", "6"] and values["seed"] == ["7", "8"] and len(values["prompt"]) == 3


def test_ids_are_unique_stable_and_survive_unrelated_edits(tmp_path):
    a = plan(load(tmp_path))
    assert len({j.id for j in a}) == len(a) and all(len(j.id) == 12 for j in a)
    assert [j.id for j in plan(load(tmp_path))] == [j.id for j in a]
    # add a seed and a prompt: every old job keeps its id even though indices move
    edited = RECIPE.replace("seeds: [7, 8]", "seeds: [7, 8, 9]").replace("  - a plate", "  - a plate\n  - a bowl")
    b = plan(load(tmp_path, edited))
    assert {j.id for j in a} < {j.id for j in b}
    # the content, not the position, defines the id
    changed = plan(load(tmp_path, RECIPE.replace("guidance: 3", "guidance: 4")))
    assert not {j.id for j in a} & {j.id for j in changed}


def test_group_keys_are_contiguous(tmp_path):
    jobs = plan(load(tmp_path))
    keys = [j.group_key for j in jobs]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(keys)) == 2  # one group per step count


def test_plan_is_pure(tmp_path, monkeypatch):
    recipe = load(tmp_path)
    import builtins

    def no_open(*a, **k):
        raise AssertionError("plan touched the disk")

    monkeypatch.setattr(builtins, "open", no_open)
    assert len(plan(recipe)) == 12


def test_job_content_is_what_its_id_hashes(tmp_path):
    from imagegen.plan import job_id

    for job in plan(load(tmp_path)):
        assert job_id(job.content()) == job.id
