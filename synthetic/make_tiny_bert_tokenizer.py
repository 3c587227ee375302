"""Write the tiny BERT WordPiece vocabulary used by the ``tiny-bert`` domain-encoder presets.

Real domain encoders (CXR-BERT, PubMedBERT, ...) have 30k-entry vocabularies that cannot be
downloaded offline. This one keeps BERT's WordPiece format (one token per line, the id is the line
number, ``##`` marks a word continuation) with a vocabulary small enough for a 32-wide encoder:

* the five special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4),
* whole words common in LAION captions and in the suite's radiology prompts, so those are single tokens,
* every lowercase letter, digit and ASCII punctuation mark, alone and as a ``##`` continuation, so any
  lowercased ASCII text tokenises (letter by letter where a word is not listed) instead of becoming ``[UNK]``.

The tokenizer lower-cases and strips accents (``do_lower_case=True``), as uncased BERT does.

Run ``python -m synthetic.make_tiny_bert_tokenizer`` to regenerate
``synthetic/assets/tiny_bert_tokenizer/vocab.txt``.
"""
from __future__ import annotations

import string
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# LAION-like caption words (articles, prepositions, common nouns and adjectives of stock-photo captions)
CAPTION_WORDS = """
a an the of in on at to for with and or by from as is are be this that it its new
photo photograph picture image images illustration vector drawing painting rendering art poster print
style design logo icon background pattern texture stock free high quality hd
man woman men women people person girl boy child children baby family couple
dog cat bird horse animal flower flowers tree trees forest garden beach sea ocean water sky sun
city street house home building room kitchen car road mountain lake river snow winter summer
white black red blue green yellow pink orange brown gray grey gold silver dark light bright
old young big small large little beautiful happy cute close up view top side front back
shirt dress shoes bag book table chair wall window door food cake coffee
""".split()

# Radiology and the suite's prompts (the paper's prompts and the textual-inversion templates)
RADIOLOGY_WORDS = """
lung lungs xray x-ray chest radiograph radiology radiologic frontal lateral pa ap
pleural effusion effusions cardiomegaly no finding findings visible normal enlarged heart
opacity opacities pneumothorax consolidation edema atelectasis pneumonia lesion fracture
mediastinum cardiomediastinum support devices acute cardiopulmonary process bilateral left right
mild moderate severe there without evidence of focal interval unchanged
""".split()


def build() -> list[str]:
    tokens = list(SPECIAL)
    seen = set(tokens)

    def add(tok: str) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)

    for word in CAPTION_WORDS + RADIOLOGY_WORDS:
        # BERT's basic tokenizer splits on punctuation ("x-ray" -> "x", "-", "ray"): list the pieces
        for piece in word.replace("-", " - ").split():
            add(piece.lower())
    singles = string.ascii_lowercase + string.digits
    for ch in singles + string.punctuation:
        add(ch)
    for ch in singles:
        add("##" + ch)
    return tokens


def main(out: Path = Path(__file__).resolve().parent / "assets" / "tiny_bert_tokenizer") -> None:
    tokens = build()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    print(f"wrote {out / 'vocab.txt'}: {len(tokens)} tokens")


if __name__ == "__main__":
    main()
