"""Benchmark: `imagegen validate` on hostile and huge recipes answers within two seconds.

Not a test (the tests check each input's message; this measures the time). Each case writes a
recipe (and its wildcard files) into a temporary folder and runs `imagegen validate` on it in a
fresh process, timing the whole command (interpreter start included) with a 60-s guard. The
target (issue 11): every case answers, with a one-line error or "ok", within 2 s.

    .venv/bin/python bench/validate_limits.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 2.0
HEAD = "name: bomb\nmodel:\n  checkpoint: builtin:tiny-sd15\n"


def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return HEAD + 'prompt: "p"\n' + "\n".join(lines) + f"\nseeds: *a{levels - 1}\n"


def cases(folder: Path) -> dict[str, str]:
    words = folder / "wild"
    words.mkdir()
    (words / "big.txt").write_text("\n".join(f"word{i}" for i in range(20_000)))
    sixty = "|".join(f"w{i}" for i in range(60))
    return {
        "alias bomb, 6 levels": alias_bomb(6),
        "alias bomb, 9 levels": alias_bomb(9),
        "choose 8 of 60": HEAD + f'prompt: "{{8$${sixty}}}"\n',
        "1000 x 999 variants": HEAD + 'prompt: "{' + "|".join(f"a{i}" for i in range(1000)) + "} {"
                               + "|".join(f"b{i}" for i in range(999)) + '}"\n',
        "20000-line wildcard, max_jobs 10": HEAD + 'prompt: "__big__"\nwildcards: wild\nmax_jobs: 10\n',
        "5-million seed list": HEAD + 'prompt: "p"\nseeds: [' + ", ".join(map(str, range(5_000_000))) + "]\n",
        "seeds nested 5000 deep": HEAD + 'prompt: "p"\nseeds: ' + "[" * 5000 + "]" * 5000 + "\n",
        "500 nested mappings": HEAD + 'prompt: "p"\nx: ' + "{a: " * 500 + "1" + "}" * 500 + "\n",
        "3000 nested groups": HEAD + 'prompt: "' + "{a|" * 3000 + "}" * 3000 + '"\n',
        "max_jobs 1e21, seeds 2^32": HEAD + 'prompt: "p"\nmax_jobs: 1000000000000000000000\nseeds: 4294967296\n',
        "1.25 MB of comments": HEAD + 'prompt: "p"\n' + "".join(f"# comment line {i:06d} " + "x" * 40 + "\n"
                                                           for i in range(20_000)),
    }


def main() -> int:
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="imagegen-bench-validate-") as tmp:
        folder = Path(tmp)
        for i, (label, text) in enumerate(cases(folder).items()):
            path = folder / f"case{i:02d}.yaml"
            path.write_text(text)
            started = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, "-m", "imagegen", "validate", str(path)], capture_output=True,
                                      text=True, timeout=60)
                seconds = time.perf_counter() - started
                said = (proc.stdout + proc.stderr).strip().splitlines()
                outcome = f"exit {proc.returncode}, {len(said)} line(s): {said[0][len(str(path)):][:90] if said else ''}"
            except subprocess.TimeoutExpired:
                seconds, outcome = 60.0, "TIMEOUT after 60 s"
            worst = max(worst, seconds)
            print(f"{label:<34} {seconds:6.2f} s  {outcome}")
    ok = worst <= TARGET_SECONDS
    print(f"slowest: {worst:.2f} s (target <= {TARGET_SECONDS:.0f} s): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
