"""What a plan costs in quality: perplexity under CQIL, and under layer removal for comparison.

    ppl = perplexity(model, batches)                              # the original model
    ppl = perplexity(model, batches, plan=CQILConfig(start=12, end=28))
    ppl = perplexity(model, batches, removed=[25, 26, 27])        # ShortGPT-style removal
    probe = QualityProbe(model, batches, prompts)                 # perplexity and agreement with the original
    probe.measure(plan=plan)                                      # Quality(perplexity, next_token, greedy, copying)

Perplexity is exp of the mean next-token cross-entropy over every predicted
token of every batch, computed eagerly with the reference semantics
(:func:`cqil_fx.eager.reference.cqil_semantics`): the backend computes the same
logits (tests check it), so the numbers hold for compiled models too.

"copying" is the share of a repeated random sequence a model predicts from
its first occurrence (:func:`repeated_random_tokens`): in-context copying,
which needs attention to compose across blocks (an induction head reads
what an earlier block's attention wrote) and which grouping adjacent blocks
can break while perplexity on ordinary text hides it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..config import CQILConfig, Plan
from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..stack import decoder_layers
from ..tokens import NextTokenLoss
from .reference import cqil_semantics, layer_input


def perplexity(model: nn.Module, batches: Iterable[torch.Tensor], plan: Plan | CQILConfig | None = None,
               removed: Sequence[int] = (), progress: bool = False,
               per_batch: Callable[[int], contextlib.AbstractContextManager] | None = None) -> float:
    """Perplexity of ``model`` on ``batches`` of token ids, under ``plan`` or with ``removed`` blocks.

    ``per_batch(b)``: a context each batch ``b`` runs in (the planner replays recorded block outputs)."""
    if plan is not None and removed:
        raise CQILConfigError("give plan= or removed=, not both")
    semantics = cqil_semantics(model, plan) if plan is not None else removed_blocks(model, removed)
    loss = NextTokenLoss()
    with semantics, torch.no_grad():
        for b, ids in enumerate(_progress(batches, progress, "perplexity")):
            with per_batch(b) if per_batch is not None else contextlib.nullcontext():
                loss.add(model(ids, use_cache=False).logits, ids)
    return loss.perplexity


@contextlib.contextmanager
def removed_blocks(model: nn.Module, indices: Sequence[int]) -> Iterator[None]:
    """Within the block, the listed decoder blocks pass their input through unchanged."""
    layers = decoder_layers(model)
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad:
        raise CQILConfigError(f"cannot remove blocks {bad}: the model has {len(layers)} blocks")
    handles = [layers[i].register_forward_hook(_pass_through, with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _pass_through(module, args, kwargs, output):
    hidden = layer_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclasses.dataclass(frozen=True)
class Quality:
    """What a plan (or a removal) does to held-out text: perplexity and agreement with the original."""

    perplexity: float
    next_token: float  # share of positions whose most likely next token is the original's
    greedy: float  # share of greedy continuation tokens equal to the original's, position by position
    copying: float  # share of a repeated random sequence's second half predicted from its first


def repeated_random_tokens(vocab_size: int, count: int = 8, length: int = 64, seed: int = 0,
                           bos: int | None = None) -> torch.Tensor:
    """``count`` rows of ``[bos,] r, r``: ``length`` random ids (from the middle of the vocabulary, away
    from special tokens at its start) written twice. Only copying predicts the second ``r``."""
    if length < 2 or count < 1 or vocab_size < 8:
        raise CQILConfigError(f"repeated_random_tokens: length {length} (>= 2), count {count} (>= 1), "
                              f"vocabulary {vocab_size} (>= 8)")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size // 8, vocab_size // 2, (count, length), generator=generator)
    rows = torch.cat([ids, ids], dim=1)
    return rows if bos is None else torch.cat([torch.full((count, 1), bos), rows], dim=1)


def copying(logits: torch.Tensor, ids: torch.Tensor, length: int) -> float:
    """Share of the second copy's tokens (all but its first, which nothing predicts) that ``logits``
    (of ``ids`` from :func:`repeated_random_tokens`) rank first."""
    second = ids.shape[1] - length  # where the second copy starts
    predicted = logits[:, second:ids.shape[1] - 1].argmax(-1)
    return (predicted == ids[:, second + 1:]).float().mean().item()


def measure_copying(model: nn.Module, plan: Plan | CQILConfig | None = None, rows: int = 8,
                    length: int = 64, seed: int = 0) -> float:
    """:func:`copying` of ``model`` (under ``plan``) on ``rows`` repeated random sequences of ``length`` tokens
    (``seed`` 0: the sequences every quality report measures)."""
    semantics = cqil_semantics(model, plan) if plan is not None else contextlib.nullcontext()
    with semantics, torch.no_grad():
        return _copying_now(model, rows, length, seed)


def _copying_now(model: nn.Module, rows: int, length: int, seed: int = 0) -> float:
    """:func:`copying` of ``model`` as it computes now (under whatever semantics the caller entered)."""
    ids = repeated_random_tokens(model.config.vocab_size, rows, length, seed=seed,
                                 bos=getattr(model.config, "bos_token_id", None))
    return copying(model(ids, use_cache=False).logits, ids, length)


class QualityProbe:
    """Perplexity, next-token agreement, greedy-continuation agreement and copying on fixed held-out data.

    The original's answers (its argmax at every position, its greedy
    continuation of every prompt) are computed once, here; :meth:`measure`
    then costs one pass over ``batches``, one greedy generation and one pass
    over ``copy_rows`` repeated random sequences of ``copy_length`` tokens.
    """

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor], prompts: torch.Tensor,
                 new_tokens: int = 16, copy_rows: int = 8, copy_length: int = 64):
        self.model, self.batches, self.prompts, self.new_tokens = model, list(batches), prompts, new_tokens
        self.copy_rows, self.copy_length = copy_rows, copy_length
        with torch.no_grad():
            self.argmax = [model(ids, use_cache=False).logits.argmax(-1) for ids in self.batches]
        self.continuation = self._continue()

    @classmethod
    def like(cls, probe: QualityProbe, model: nn.Module) -> QualityProbe:
        """A probe of ``model`` (a recovered copy, say) judged against ``probe``'s original answers."""
        other = cls.__new__(cls)
        other.model, other.batches, other.prompts, other.new_tokens = model, probe.batches, probe.prompts, \
            probe.new_tokens
        other.copy_rows, other.copy_length = probe.copy_rows, probe.copy_length
        other.argmax, other.continuation = probe.argmax, probe.continuation
        return other

    def measure(self, plan: Plan | CQILConfig | None = None, removed: Sequence[int] = ()) -> Quality:
        semantics = cqil_semantics(self.model, plan) if plan is not None else removed_blocks(self.model, removed)
        loss, agree, positions = NextTokenLoss(), 0, 0
        with semantics, torch.no_grad():
            for ids, reference in zip(self.batches, self.argmax):
                logits = self.model(ids, use_cache=False).logits
                loss.add(logits, ids)
                agree += (logits.argmax(-1) == reference).sum().item()
                positions += reference.numel()
            continuation = self._continue()
            copied = _copying_now(self.model, self.copy_rows, self.copy_length)
        greedy = (continuation == self.continuation).float().mean().item()
        return Quality(loss.perplexity, agree / positions, greedy, copied)

    def _continue(self) -> torch.Tensor:
        """Greedy continuations of the prompts, ``new_tokens`` each, with the KV cache."""
        out = self.model.generate(self.prompts, attention_mask=torch.ones_like(self.prompts), do_sample=False,
                                  max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                  pad_token_id=0)
        return out[:, self.prompts.shape[1]:]
