import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagegen.cli import run_app

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = run_app([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_validate_ok_and_bad_mixed(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {checkpoint: builtin:tiny-sd15}\nprompt: a\nsteps: -1\n")
    code, out, err = run(["validate", ROOT / "recipes" / "example.yaml", bad], capsys)
    assert code == 2
    assert "example.yaml: ok, 48 jobs" in out
    assert err.strip() == f"{bad}:4:8: `steps` must be a whole number from 1 to 500, got -1"


def test_plan_table_and_json(capsys):
    code, out, _ = run(["plan", ROOT / "recipes" / "example.yaml", "--limit", "3"], capsys)
    assert code == 0 and "total jobs" in out and "48" in out
    code, out, _ = run(["plan", ROOT / "recipes" / "example.yaml", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["total"] == 48 and len(data["jobs"]) == 48
    assert data["jobs"][0]["index"] == 1 and len(data["jobs"][0]["id"]) == 12


def test_plan_warns_about_missing_user_files(capsys):
    code, out, err = run(["plan", ROOT / "recipes" / "sdxl-packshot.yaml", "--limit", "0"], capsys)
    assert code == 0 and "1000" in out
    assert err.count("not found") == 5  # checkpoint, two LoRAs, the upscaler twice (upscale: and hires:)
    assert "then a hires pass at 1536x1536 (2.36 MP)" in out


def test_usage_errors_exit_2(capsys):
    assert run(["plan"], capsys)[0] == 2
    assert run(["nosuchcommand"], capsys)[0] == 2
    assert run(["validate", "/nonexistent.yaml"], capsys)[0] == 2


def test_help_validate_plan_do_not_import_torch():
    code = textwrap.dedent(f"""
        import sys
        from imagegen.cli import run_app
        for argv in (["--help"], ["validate", r"{ROOT / 'recipes' / 'example.yaml'}"], ["plan", r"{ROOT / 'recipes' / 'example.yaml'}"]):
            try:
                run_app(argv)
            except SystemExit:
                pass
        heavy = [m for m in ("torch", "diffusers", "transformers") if m in sys.modules]
        print("HEAVY", heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "imagegen", "validate", str(ROOT / "recipes" / "example.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "ok, 48 jobs" in proc.stdout


KEYS = ["name", "model", "checkpoint", "family", "prompt", "prompts", "seeds", "size", "steps", "guidance",
        "scheduler", "loras", "path", "weight", "lora_sets", "upscale", "batch_size", "max_jobs", "negative", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["builtin:tiny-sd15", "{a|b", "1024x1024", "10-5", "Euler a"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(KEYS), values, max_size=8))
def test_fuzz_malformed_recipes_give_clean_exit_2(tmp_path_factory, data):
    import yaml

    path = tmp_path_factory.mktemp("fz") / "r.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    code = run_app(["validate", str(path)])
    assert code in (0, 2)


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(list("ab:{}[]|-\n\t '\"#&*!%@`,?>\x00") + ["name: ", "model:\n  checkpoint: ", "prompt: "]), max_size=40).map("".join))
def test_fuzz_malformed_yaml_give_clean_exit_2(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fy") / "r.yaml"
    path.write_text(text)
    code = run_app(["validate", str(path)])
    assert code == 2


def test_version(capsys):
    from imagegen import __version__

    assert run_app(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imagegen {__version__}"


COMMANDS = ["validate", "plan", "render", "status", "reproduce", "sheet", "pick", "picks", "upscale", "serve", "submit",
            "queue", "cancel"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_pages_read_as_people_type_and_show_examples(command, capsys):
    assert run_app([command, "--help"]) == 0
    page = capsys.readouterr().out
    usage = next(line for line in page.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage  # `RUN...`, never `{RUN...}...`
    assert "<bool>" not in page and "<list[" not in page, page  # a flag takes no value: never `--json true`
    assert "Examples:" in page and f"imagegen {command} " in page.split("Examples:")[1]
