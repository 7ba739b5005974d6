"""The package's import graph, read with `ast` (nothing is imported): arrows go one way.

- no import cycles between imagegen modules (module-level and function-level imports both
  count: a lazy import is still an arrow);
- torch, diffusers and transformers only at module level inside engine/ and upscale/;
- the core never imports `imagegen.cli`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "imagegen"
HEAVY = ("torch", "diffusers", "transformers")
HEAVY_ALLOWED = ("imagegen.engine", "imagegen.upscale")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for each import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.discard(id(node))
    type_checking = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                     for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from imagegen.upscale import arch` imports the module `arch`; other names come
            # from `mod` itself
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        for t in targets:
            out.append((t, node.lineno, id(node) in top_level))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for target, _, _ in imports(path, name, known):
            # importing a.b.c runs a and a.b too; the arrow that matters is to the module itself
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "imagegen":
                edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles():
    edges = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_heavy_libraries_only_at_module_level_in_engine_and_upscale():
    known = set(modules())
    bad = []
    for name, path in modules().items():
        if name.startswith(HEAVY_ALLOWED):
            continue
        for target, line, top in imports(path, name, known):
            if top and target.split(".")[0] in HEAVY:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target} at module level")
    assert not bad, "\n".join(bad)


def test_core_never_imports_the_cli():
    known = set(modules())
    bad = []
    for name, path in modules().items():
        if name.startswith("imagegen.cli") or name == "imagegen.__main__":
            continue
        for target, line, _ in imports(path, name, known):
            if target == "imagegen.cli" or target.startswith("imagegen.cli."):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}")
    assert not bad, "\n".join(bad)


def test_the_walker_sees_the_package():
    edges = graph()
    assert "imagegen.recipe" in edges and "imagegen.plan" in edges
    assert "imagegen.recipe" in edges["imagegen.plan"]  # plan reads recipes
    assert "imagegen.plan" not in edges["imagegen.recipe"]


def test_validate_and_plan_load_neither_numpy_nor_pillow():
    """`validate` and `plan` read YAML and file headers only (the upscaler's numpy and Pillow stay out)."""
    import subprocess
    import sys
    import textwrap

    recipe = PACKAGE.parent / "recipes" / "example.yaml"
    code = textwrap.dedent(f"""
        import sys
        from imagegen.cli import run_app
        for argv in (["validate", r"{recipe}"], ["plan", r"{recipe}"]):
            try:
                run_app(argv)
            except SystemExit:
                pass
        print("HEAVY", [m for m in ("torch", "diffusers", "transformers", "numpy", "PIL") if m in sys.modules])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert "HEAVY []" in out
