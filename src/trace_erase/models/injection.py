"""How an attack feeds its variables into a pipeline without editing it: word embeddings spliced in at filler-token
positions by a forward hook on each text encoder's input-embedding table (the word level), and whole conditioning
tensors handed to the pipeline's ``prompt_embeds`` arguments (the conditioning level).

The hooks are removed on exit; no weight, tokenizer or pipeline attribute changes. A prompt carries the attack's k
slots as k copies of a filler word that every tokenizer of the pipeline spells as one token; rows without the filler
(the negative prompt) pass through untouched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import TraceEraseError
from ..models.base import Conditioning, FamilyAdapter

FILLERS = ("thing", "object", "x")  # tried in order: the first that is one token in every tokenizer


def single_token_id(tok: Any, word: str) -> int | None:
    """The id of ``word`` when ``tok`` spells it (after a space) as exactly one token, else None."""
    ids = tok(word, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


class WordSlots:
    """k word-embedding slots per text encoder of a pipeline, filled by forward hooks while :meth:`active`.

    ``values[i]`` is a ``[k, d_i]`` tensor for encoder ``i`` (its own width); the i-th occurrence of the filler in a
    row takes row i. Gradients flow from the encoders' outputs back into ``values``."""

    def __init__(self, adapter: FamilyAdapter, k: int, prompts: list[str] = ()):
        self.adapter, self.k = adapter, int(k)
        self.encoders = adapter.text_encoders()
        if not self.encoders:
            raise TraceEraseError(f"this {adapter.family} pipeline has no text encoder to attack")
        for word in FILLERS:
            ids = [single_token_id(tok, word) for tok, _ in self.encoders]
            if all(i is not None for i in ids) and not any(word in p.split() for p in prompts):
                self.filler, self.filler_ids = word, [int(i) for i in ids]
                break
        else:
            raise TraceEraseError(f"no filler word ({', '.join(FILLERS)}) is a single token in every tokenizer of "
                                  "this pipeline; word-level attacks cannot place their slots")

    def tables(self) -> list[torch.Tensor]:
        """Each encoder's input-embedding table ``[V_i, d_i]`` (the weights, detached)."""
        return [enc.get_input_embeddings().weight.detach() for _, enc in self.encoders]

    @functools.cached_property
    def _scales(self) -> list[float]:
        rms = [table_rms(t) for t in self.tables()]
        return [r / rms[0] for r in rms]

    def scales(self) -> list[float]:
        """Each encoder's word-embedding scale (the RMS of its table) over the first encoder's, measured once per
        slots object. An optimiser's step in encoder i is multiplied by ``scales()[i]``, so one learning rate is the
        same relative move in every table: FLUX's T5 embeddings are ~45× its CLIP's on toy-flux, and an lr set for
        CLIP barely moves a T5 slot."""
        return list(self._scales)

    def param_groups(self, values: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
                     encoders: list[int] | None = None) -> list[dict[str, Any]]:
        """Optimiser parameter groups for ``values`` (the slots of ``encoders``, default all of them, in order): lr
        scaled by each encoder's :meth:`scales`, weight decay divided by it (AdamW's per-step shrink stays
        ``lr·weight_decay`` in every table). ``lr`` is in the first encoder's units: the papers' rates are CLIP's."""
        scale = self.scales()
        which = list(range(len(values))) if encoders is None else encoders
        return [{"params": [v], "lr": lr * scale[i], "weight_decay": weight_decay / scale[i]}
                for v, i in zip(values, which, strict=True)]

    def init_from(self, word: str) -> list[torch.Tensor]:
        """Slot values that start at ``word``'s embedding (its first token) in every encoder, ``[k, d_i]`` each."""
        out = []
        for (tok, _), table in zip(self.encoders, self.tables(), strict=True):
            ids = tok(word, add_special_tokens=False)["input_ids"] or [self.filler_ids[0]]
            out.append(table[int(ids[0])].float().repeat(self.k, 1).clone())
        return out

    def init_random(self, gen: torch.Generator) -> list[torch.Tensor]:
        """Slot values that start at k random vocabulary words (the same ids in every encoder), ``[k, d_i]`` each:
        AdvUnlearn's random restart of its inner attack."""
        tables = self.tables()
        ids = torch.randint(0, min(t.shape[0] for t in tables), (self.k,), generator=gen)
        return [t[ids.to(t.device)].float().clone() for t in tables]

    def prefixed(self, prompt: str) -> str:
        """``prompt`` with the k slots in front (AdvUnlearn's and UnlearnDiffAtk's prefix insertion)."""
        return " ".join([self.filler] * self.k + [prompt])

    def placed(self, template: str) -> str:
        """``template`` with its ``{}`` replaced by the k slots (textual inversion's placeholder)."""
        return template.replace("{}", " ".join([self.filler] * self.k))

    @contextlib.contextmanager
    def active(self, values: list[torch.Tensor | None]) -> Iterator[None]:
        """While inside, every prompt with k filler tokens encodes with ``values`` at those positions (None: that
        encoder keeps the filler's own embedding)."""
        handles = []
        for (_, enc), fid, val in zip(self.encoders, self.filler_ids, values, strict=True):
            if val is None:
                continue

            def splice(mod: torch.nn.Module, args: tuple, out: torch.Tensor, fid: int = fid,
                       val: torch.Tensor = val) -> torch.Tensor:
                ids = args[0] if args else None
                if ids is None:
                    return out
                mask = ids == fid
                rows = [b for b in range(ids.shape[0]) if int(mask[b].sum()) == self.k]
                if not rows:
                    return out
                out = out.clone()
                for b in rows:
                    out[b, mask[b]] = val.to(out.device, out.dtype)  # an offloaded encoder runs on the CPU
                return out

            for table in token_tables(enc):
                handles.append(table.register_forward_hook(splice))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def table_rms(table: torch.Tensor, rows: int = 4096) -> float:
    """The root mean square of an embedding table, summed in float32 a block of ``rows`` at a time (T5-XXL's bf16
    table is 32k × 4096: a whole float32 copy would be half a gigabyte on the GPU)."""
    total = sum(float(table[i:i + rows].float().pow(2).sum()) for i in range(0, table.shape[0], rows))
    return (total / table.numel()) ** 0.5


def token_tables(encoder: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The embedding modules that map an encoder's token ids to word embeddings: its input embeddings and any
    module of the same shape (T5 in transformers 5 keeps a separate ``encoder.embed_tokens`` tied to ``shared``)."""
    ref = encoder.get_input_embeddings()
    return [m for m in encoder.modules() if isinstance(m, torch.nn.Embedding)
            and (m is ref or (m.num_embeddings, m.embedding_dim) == (ref.num_embeddings, ref.embedding_dim))]


def decode_tokens(tok: Any, ids: list[int]) -> str:
    """Token ids as the text a user would type (what a token-level attack's prompt is)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def typable_ids(tok: Any) -> list[int]:
    """Ids of the tokens a user can type one by one: each decodes to printable text that tokenizes back to that one
    token (whole words; no special tokens, no partial bytes, no mid-word pieces, no control characters)."""
    special = set(tok.all_special_ids)
    ids = [i for i in range(len(tok)) if i not in special]
    texts = tok.batch_decode([[i] for i in ids])
    back = tok(texts, add_special_tokens=False)["input_ids"]
    return [i for i, t, b in zip(ids, texts, back, strict=True) if b == [i] and t.strip() and t.isprintable()]


def editable(cond: Conditioning) -> list[str]:
    """The conditioning tensors an attack at the conditioning level may change: the text features (not the
    guidance scale or SDXL's size ids)."""
    return [k for k, v in cond.tensors.items() if v.is_floating_point() and k not in ("guidance", "time_ids")]


def embeds_for(adapter: FamilyAdapter, table: dict[str, Conditioning], uncond: Conditioning) -> Any:
    """A ``generate_images(embeds=...)`` callable: a batch of prompts gets each prompt's row of ``table`` (one row
    per prompt) and ``uncond`` (one row) as its negative branch."""

    def fn(chunk: list[str]) -> dict[str, Any]:
        c = Conditioning.cat([table[p] for p in chunk])
        u = Conditioning({k: v[:1].repeat_interleave(len(chunk), 0) for k, v in uncond.tensors.items()})
        return adapter.pipeline_embeds(Conditioning({k: v.detach() for k, v in c.tensors.items()}), u)

    return fn


@contextlib.contextmanager
def no_param_grads(modules: list[torch.nn.Module]) -> Iterator[None]:
    """No parameter gradients while an attack optimises its inputs through ``modules`` (restored on exit)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
