"""Which token positions of a prompt carry the concept, and which positions of the anchor prompt they map to: the
closed-form engine's token selections (``ClosedFormConfig.token_selection``)."""

from __future__ import annotations

from ..models.base import SegmentedLayout, TokenLayout

TOKEN_SELECTIONS = ("surrounding", "context", "target", "last", "all", "trce")
# TRCE's token classes, in the order of ``token_weights``, and its default weights (its stage-1 configs' [0, 1, 0, 0])
TOKEN_CLASSES = ("start", "first end", "last end", "key")
TRCE_TOKEN_WEIGHTS = (0.0, 1.0, 0.0, 0.0)


def aligned_positions(
    lt: TokenLayout | SegmentedLayout, la: TokenLayout | SegmentedLayout, mode: str, suffix_tokens: int | None = None,
    bidirectional: bool = False
) -> tuple[list[int], list[int]]:
    """Pairs of positions (target prompt → anchor prompt) that ``mode`` maps.

    Prefix tokens share their index; the concept's n tokens map onto the anchor's m tokens proportionally (onto the
    position the anchor would take when it is empty); tokens after the concept align by their offset from its end.
    A causal encoder's prefix never sees the concept, so only ``all`` maps it; with a ``bidirectional`` encoder (T5)
    every prefix position carries the concept too, and the modes that map the positions after the concept
    (surrounding, context, last) map the prefix as well.
    """
    if isinstance(lt, SegmentedLayout):  # a joint sequence of several encoders: align each segment on its own
        tgt, anc = [], []
        for (offset, a, bidi), (_, b, _) in zip(lt.parts, la.parts, strict=True):
            t, u = aligned_positions(a, b, mode, suffix_tokens, bidi)
            tgt += [offset + i for i in t]
            anc += [offset + i for i in u]
        return tgt, anc
    n, m = lt.end - lt.start, la.end - la.start
    tgt: list[int] = []
    anc: list[int] = []
    if mode == "all" or (bidirectional and mode in ("surrounding", "context", "last")):
        for i in range(min(lt.start, la.start)):
            tgt.append(i)
            anc.append(i)
    if mode in ("all", "surrounding", "target"):
        concept_js = range(n)
    elif mode == "last":
        concept_js = range(n - 1, n)
    else:
        concept_js = range(0)
    for j in concept_js:
        tgt.append(lt.start + j)
        anc.append(la.start + (min(j * m // n, m - 1) if m > 0 else 0))
    if mode in ("all", "surrounding", "context", "last"):
        limit = lt.max_length - max(lt.end, la.end)
        if suffix_tokens is not None and mode != "all":
            limit = min(limit, suffix_tokens)
        for k in range(max(limit, 0)):
            tgt.append(lt.end + k)
            anc.append(la.end + k)
    return tgt, anc


def class_positions(lt: TokenLayout, la: TokenLayout, weights: list[float] | tuple[float, ...]
                    ) -> tuple[list[int], list[int], list[float]]:
    """TRCE's token classes: (target position, anchor position, weight) rows, weights in :data:`TOKEN_CLASSES` order.

    The start token maps to the anchor's start token, the first end token to the anchor's first end token, the last
    position to the anchor's last position, and each of the concept's tokens to the anchor's last position. The
    last-position row stands for the whole run of positions after the first end token, so its weight is multiplied
    by their number. Rows of weight 0 are left out (they would add nothing to the Gram matrices).
    """
    w_start, w_first, w_last, w_key = weights
    first_t, first_a = lt.length - 1, la.length - 1
    last_t, last_a = lt.max_length - 1, la.max_length - 1
    rows = [(0, 0, w_start), (first_t, first_a, w_first), (last_t, last_a, w_last * (lt.max_length - lt.length))]
    rows += [(i, last_a, w_key) for i in range(lt.start, lt.end)]
    kept = [r for r in rows if r[2] > 0]
    return [r[0] for r in kept], [r[1] for r in kept], [float(r[2]) for r in kept]
