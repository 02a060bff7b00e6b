"""Write a toy model's candidate words for neighbour preservation with every toy class, synonym and style (and
their word-final pieces) taken out.

The toy models' CLIP tokenizers know ~200 whole words, most of them the toy world's own class names, synonyms,
colours and styles, so neighbours drawn from ``neighbour_vocab=model`` are largely the evaluation's other classes
(the shapes for the objects suite, the styles for the styles suite). This list is the control: the same vocabulary
without any of those words, so a retention gain that survives it does not come from preserving what the evaluation
scores.

    python benchmarks/class_blind_vocab.py --model toy-sd --output benchmarks/data/toy-sd-vocab-class-blind.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _script import refuse, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-sd", help="toy-sd or toy-flux")
    parser.add_argument("--output", required=True, help="text file to write, one word per line")
    args = parser.parse_args()

    from transformers import CLIPTokenizer

    from trace_erase.engines.neighbours import STOPWORDS
    from trace_erase.toyworld.render import CLASSES, STYLES, SYNONYMS

    if args.model not in ("toy-sd", "toy-flux"):
        refuse(f"--model must be toy-sd or toy-flux, not '{args.model}'")
    folder = Path(__file__).resolve().parents[1] / "src/trace_erase/toyworld/assets" / args.model / "tokenizer"
    vocab = CLIPTokenizer.from_pretrained(folder).get_vocab()
    synonyms = {w for names in SYNONYMS.values() for name in names for w in name.split()}
    class_words = set(CLASSES) | set(STYLES) | synonyms
    words = sorted({w[:-4] for w in vocab if w.endswith("</w>")} - class_words - STOPWORDS)
    # and the word-final pieces of those words ("amond</w>" ends "diamond"), which stand for them too
    words = [w for w in words if w.isalpha() and len(w) >= 3 and not any(c.endswith(w) for c in class_words)]
    Path(args.output).write_text("\n".join(words) + "\n")
    print(f"{len(words)} words (left out {len(class_words)} class and style words) → {args.output}")
    return 0


if __name__ == "__main__":
    run(main)
