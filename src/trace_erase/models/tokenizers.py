"""Offline tokenizers built from a word list (no hub download).

A CLIP byte-level BPE whose merges spell each listed word as one token (unknown words fall back to single
bytes), and a T5-style unigram tokenizer with the same words. Both are the real ``transformers`` classes, save
with ``save_pretrained`` and give character offsets, so they go through the same code paths as SD's and FLUX's.
"""

from __future__ import annotations

import re

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer

BASIC_WORDS = (
    "a an the of in on at by with and or to from photo picture image painting drawing artwork sketch render "
    "style portrait person people man woman child face clothes wearing nude naked dog cat car house tree "
    "flower bird horse boat airplane truck ship frog deer landscape city street sky sea mountain river "
    "red green blue yellow white black orange purple pink gray brown big small large tiny one two three "
    "close up view high quality detailed simple colorful bright dark photograph scene object shape thing "
    "famous artist celebrity van gogh monet picasso"
).split()


def _words(words: list[str] | tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for w in words:
        for piece in re.findall(r"[a-z0-9]+", w.lower()):
            seen.setdefault(piece, None)
    return list(seen)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learned on ``words`` until each is one symbol; ties broken lexicographically (deterministic)."""
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def build_clip_tokenizer(words: list[str] | tuple[str, ...] = BASIC_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is the byte alphabet plus one token per word of ``words``.

    The merges are learned by BPE on the word list until every listed word is a single token (hand-written merges
    would collide between words); unknown words fall back to bytes. Same words → same ids, always.
    """
    alphabet = sorted(ByteLevel.alphabet())
    merges = learn_merges(_words(words))
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(ch + "</w>" for ch in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def build_t5_tokenizer(words: list[str] | tuple[str, ...] = BASIC_WORDS, max_length: int = 32) -> T5Tokenizer:
    """A T5Tokenizer (unigram) with one piece per word of ``words`` plus lowercase letters and digits."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in _words(words)]
    pieces += [("▁", -4.0)] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair segmentation of one word (``</w>`` on its last symbol) with merges of the given ranks."""
    seq = [*word[:-1], word[-1] + "</w>"]
    while len(seq) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(seq, seq[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            return seq
        seq = [*seq[:i], seq[i] + seq[i + 1], *seq[i + 2:]]
    return seq


def extend_clip_tokenizer(tok: CLIPTokenizer, words: list[str] | tuple[str, ...]) -> CLIPTokenizer:
    """``tok`` with each of ``words`` made one token, appended: every existing token keeps its id and every known
    word its tokens, so a text encoder trained with ``tok`` only needs new embedding rows (``resize_token_embeddings``).

    New merges go after the old ones (lowest priority); they join the pieces the tokenizer so far splits a new word
    into, left to right, so they never fire inside a word the old merges already spell."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ranks = {m: i for i, m in enumerate(merges)}
    for word in _words(words):
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pair[0] + pair[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    out = CLIPTokenizer(vocab=vocab, merges=merges)
    out.model_max_length = tok.model_max_length
    return out


def extend_t5_tokenizer(tok: T5Tokenizer, words: list[str] | tuple[str, ...]) -> T5Tokenizer:
    """``tok`` (a :func:`build_t5_tokenizer` unigram) with each of ``words`` it lacks appended as one piece, scored
    like the other words: every existing piece keeps its id and score, so a T5 encoder trained with ``tok`` only
    needs new embedding rows (``resize_token_embeddings``). A known word stays one piece (any split of it scores
    lower than its own piece), so only words the tokenizer so far spelled letter by letter change."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    pieces: list[tuple[str, float]] = [(str(p), float(score)) for p, score in model["vocab"]]
    known = {p for p, _ in pieces}
    pieces += [("▁" + w, -2.0) for w in _words(words) if "▁" + w not in known]
    out = T5Tokenizer(vocab=pieces, extra_ids=0)
    out.model_max_length = tok.model_max_length
    return out

