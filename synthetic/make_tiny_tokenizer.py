"""Write the tiny CLIP tokenizer (vocab.json + merges.txt) used by the built-in presets.

The real SD v1.4 tokenizer has 49 408 entries and cannot be downloaded offline. This one keeps
CLIP's byte-level BPE format (``</w>`` end-of-word suffix, ``<|startoftext|>``/``<|endoftext|>``
as the two highest ids) with a vocabulary small enough for the tiny text encoder: all 256 byte
symbols (with and without ``</w>``) plus one merge chain per word of the suite's prompts, so that
those words are single tokens and any other text still tokenises, letter by letter.

Run ``python -m synthetic.make_tiny_tokenizer`` to regenerate ``synthetic/assets/tiny_clip_tokenizer``.
"""
from __future__ import annotations

import json
from pathlib import Path

WORDS = """
a an the photo of in style with and or no without visible lung lungs xray x-ray chest radiograph
radiology radiologic pleural effusion effusions cardiomegaly finding findings heart enlarged normal
small large moderate left right bilateral acute cardiopulmonary process opacity opacities
pneumothorax consolidation edema atelectasis pneumonia lesion fracture mediastinum support devices
frontal lateral view pa ap image picture scan medical film study patient is are there
<lung-xray> <pleural-effusion> <no-findings> lung-xray pleural-effusion no-findings
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build() -> tuple[dict[str, int], list[str]]:
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    seen = set(vocab_list)
    # Greedy BPE training on the word list until every word is one token: applying the merges in
    # rank order then reproduces this segmentation, so each listed word encodes as a single token.
    pieces = sorted({p for w in WORDS for p in w.replace("<", " < ").replace(">", " > ").replace("-", " - ").split()})
    words = [list(p[:-1]) + [p[-1] + "</w>"] for p in pieces]
    while any(len(w) > 1 for w in words):
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        merged = best[0] + best[1]
        if merged not in seen:
            vocab_list.append(merged)
            seen.add(merged)
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def main(out: Path = Path(__file__).resolve().parent / "assets" / "tiny_clip_tokenizer") -> None:
    vocab, merges = build()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main()
