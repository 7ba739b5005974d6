"""Build the shipped CLIP tokenizer files (`vocab.json`, `merges.txt`) from the BPE merge list
`bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI CLIP; also shipped inside the open_clip_torch
wheel). A maintenance tool, not used at run time:

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip -o /tmp/oc/*.whl -d /tmp/oc
    python -m imagegen.engine.clip_vocab /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz imagegen/data/clip-tokenizer

The layout is the standard CLIP one: 256 byte symbols, the same 256 with `</w>`, 48,894 merges
(the first 49152 - 256 - 2 lines after the header), then `<|startoftext|>` and `<|endoftext|>`:
49,408 tokens.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255 used by byte-level BPE, in CLIP's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    order = list(printable)
    codepoints = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return [chr(c) for c in codepoints]


def convert(bpe_gz: str | Path, out_dir: str | Path) -> int:
    """Write `vocab.json` and `merges.txt` into `out_dir`; return the vocabulary size."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"duplicate tokens in {bpe_gz}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(m) + "\n" for m in merges)
    return len(vocab)


if __name__ == "__main__":
    print(convert(sys.argv[1], sys.argv[2]))
