"""Text the model writes itself: calibration data that needs nothing from the user.

    batches = self_generated_text(model)                      # SELF_TOKENS tokens in (1, SELF_WINDOW) windows
    batches = self_generated_text(model, openings=[...])      # each text from one of several openings

The default plan searches on it (:func:`cqil_fx.planning.auto.plan_default`):
text the model writes is text of its own distribution, so the search needs no
data from the user (the data-free calibration of LLM-QAT, Liu et al. 2023).
Generation runs on the model's own device and dtype, with its own
``generate`` when it has one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..tokens import token_windows

SELF_TOKENS = 2048  # tokens the model writes for plan_default
SELF_WINDOW = 256  # ... in windows of this many tokens


# Openings of many kinds of text, for self-written text that covers more than what a model writes from
# its BOS token alone (``self_generated_text(openings=...)``, ``cqil-fx recover --self-openings varied``).
# Chosen to vary the kind (prose, dialogue, code, data, instructions, letters, science, news, fiction);
# nothing legal or licence-like, the kind of text the quality measurements hold out.
VARIED_OPENINGS = (
    "Chapter 1\n\n", "Ingredients:\n- ", "Q: How do", "Abstract. We study", "Dear Sam,\n\n", "BREAKING: ",
    "def main():\n    ", "Once upon a time", "Step 1:", "User: Can you", "| Name | Age |", "In mathematics, ",
    "The patient", "I bought this", "#include <stdio.h>\n", "Dialogue:\nA: ",
)


def self_generated_text(model: nn.Module, tokens: int | None = None, window: int | None = None,
                        seed: int = 0, batch: int | None = None, progress: bool = False,
                        openings: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``tokens`` tokens the model writes itself, from its BOS token, as (1, window) batches of ids.

    Sampled at temperature 1 with top-p 0.95, ``batch`` sequences at a time
    (default: one sequence per window, at most 16 at a time, so each window is
    a text from its start and the steps of generation are few),
    with a private random generator seeded by ``seed`` (the same text for the
    same model and seed). Text the model writes is text of its own
    distribution, so the plan search needs no data from the user (the
    data-free calibration of LLM-QAT, Liu et al. 2023). ``tokens`` and
    ``window`` default to :data:`SELF_TOKENS` and :data:`SELF_WINDOW`.

    ``openings``: 1-D token ids (e.g. :data:`VARIED_OPENINGS` encoded) that
    each text starts from, after the BOS token, one opening per round of
    ``batch`` texts in turn; each window holds the opening and what follows.
    By default ``batch`` is then chosen so that every opening is used.
    """
    tokens = SELF_TOKENS if tokens is None else tokens
    window = SELF_WINDOW if window is None else window
    windows = tokens // max(window, 1)
    openings = list(openings or ())
    batch = batch or max(1, min(16, windows // max(len(openings), 1)))
    if tokens < window or window < 2:
        raise CQILConfigError(f"tokens={tokens} and window={window}: need at least one window of two or more tokens")
    if any(o.dim() != 1 or not 0 < len(o) < window for o in openings):
        raise CQILConfigError(f"openings must be 1-D token ids shorter than the window ({window}), got shapes "
                              f"{[tuple(o.shape) for o in openings]}")
    start = _start_token(model)
    device = next(model.parameters()).device
    ids = torch.full((batch, 1), start, dtype=torch.long, device=device)
    with torch.no_grad(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        if windows <= batch and not openings:  # one round of sequences long enough for every window
            out = _sample(model, ids, -(-tokens // batch), progress)
            return token_windows(out[:, 1:].cpu(), window, windows)
        # Rounds of ``batch`` sequences of one window each, so each window is a text from its start
        # and no cache grows past a window (16 sequences of 2,048 tokens took over half an hour on
        # 2 cores, most of it copying the growing caches); each round from the next opening, if any.
        prompts = [torch.cat([ids, o.to(device).expand(batch, -1)], dim=1) for o in openings] or [ids]
        rounds = []
        for r in _progress(range(-(-windows // batch)), progress, "self-generated text"):
            prompt = prompts[r % len(prompts)]
            rounds.append(_sample(model, prompt, window + 1 - prompt.shape[1], False)[:, 1:].cpu())
    return token_windows(torch.cat(rounds), window, windows)


def _sample(model: nn.Module, ids: torch.Tensor, new_tokens: int, progress: bool) -> torch.Tensor:
    """Top-p sampling with a KV cache, through ``generate`` when the model has it."""
    generate = getattr(type(model), "generate", None)
    if generate is not None:
        plain = uncompiled(model)
        steps = iter(_progress(range(new_tokens), progress, "self-generated text"))
        out = plain.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_p=0.95, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=_start_token(model), use_cache=True,
                             stopping_criteria=[_StepCounter(steps)])
        for _ in steps:  # closes the bar
            pass
        return out
    for _ in _progress(range(new_tokens), progress, "self-generated text"):  # any causal LM: no cache
        logits = model(ids).logits[:, -1].float()
        ids = torch.cat([ids, _top_p(logits, 0.95)], dim=1)
    return ids


class _StepCounter:
    """A ``generate`` stopping criterion that never stops and advances ``steps`` once per token."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        next(self.steps, None)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs < p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(-1, choice)


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` with its class's own forward (a compiled ``forward`` attribute set aside), eager."""
    if "forward" not in vars(model):
        return model
    import copy

    plain = copy.copy(model)
    del plain.forward
    return plain


def _start_token(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int) and 0 <= value < getattr(config, "vocab_size", value + 1):
            return value
    return 0
