"""How similar the blocks' inputs are: the paper's signal for quasi-independence.

    report = measure_similarity(model, token_batches(tokenizer, "calibration", 256, 8))
    report.matrix[i, j]     # mean cosine similarity of block i's and block j's inputs
    report.influence[i]     # 1 - cos(input of block i, output of block i)
    save_heatmap(report, "similarity.png")

A hooked eager pass records each decoder layer's input (and the last layer's
output); similarities are averaged over every token of every batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import CQILConfigError
from ..progress import progress as _progress
from ..stack import decoder_layers
from .reference import layer_input

__all__ = ["SimilarityAccumulator", "SimilarityReport", "measure_similarity", "save_heatmap"]


@dataclasses.dataclass(frozen=True)
class SimilarityReport:
    """``matrix`` is (N+1, N+1): index i < N is block i's input, index N the stack's output."""

    matrix: torch.Tensor
    tokens: int

    @property
    def num_blocks(self) -> int:
        return self.matrix.shape[0] - 1

    @property
    def influence(self) -> torch.Tensor:
        """Per block, 1 - mean cos(input, output): how much the block changes the stream."""
        return 1 - self.matrix.diagonal(offset=1)

    def group_similarity(self, group: Sequence[int]) -> float:
        """Mean similarity of each later member's input to the group's input (1.0 = identical)."""
        first = group[0]
        return float(self.matrix[first, list(group[1:])].mean()) if len(group) > 1 else 1.0


class SimilarityAccumulator:
    """Sums token-wise cosine similarities of a stack of hidden states over batches."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def add(self, states: Sequence[torch.Tensor]) -> None:
        """``states``: one (batch, tokens, hidden) tensor per block input (and the stack output)."""
        unit = nn.functional.normalize(torch.stack(list(states)).flatten(1, -2).double(), dim=-1)
        step = torch.einsum("itd,jtd->ij", unit, unit)
        self.total = step if self.total is None else self.total + step
        self.tokens += unit.shape[1]

    def report(self) -> SimilarityReport:
        if not self.tokens:
            raise CQILConfigError("similarity needs at least one batch of token ids")
        return SimilarityReport((self.total / self.tokens).float(), self.tokens)


def measure_similarity(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = True,
                       **forward_kwargs) -> SimilarityReport:
    """Run ``model`` on each batch of token ids and average the input similarities."""
    layers = decoder_layers(model)
    states: list[torch.Tensor | None] = [None] * (len(layers) + 1)
    handles = [layer.register_forward_pre_hook(_keep_input(states, i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(_keep_output(states, len(layers))))
    accumulator = SimilarityAccumulator()
    forward_kwargs.setdefault("use_cache", False)
    try:
        with torch.no_grad():
            for ids in _progress(batches, progress, "similarity"):
                model(ids, **forward_kwargs)
                accumulator.add(states)
    finally:
        for h in handles:
            h.remove()
    return accumulator.report()


def save_heatmap(report: SimilarityReport, path: str, title: str = "cosine similarity of block inputs") -> None:
    """Write the similarity matrix as a PNG heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report.num_blocks
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(report.matrix.numpy(), cmap="viridis", vmin=float(report.matrix.min()), vmax=1.0)
    ax.set_xlabel("block input (N = stack output)")
    ax.set_ylabel("block input")
    ticks = list(range(0, n + 1, max(1, (n + 1) // 10)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_title(f"{title}\n({report.tokens} tokens)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _keep_input(states: list, i: int):
    def hook(module, args, kwargs):
        states[i] = layer_input(args, kwargs)

    return hook


def _keep_output(states: list, i: int):
    def hook(module, args, output):
        states[i] = output[0] if isinstance(output, tuple) else output

    return hook
