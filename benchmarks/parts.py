"""What several benchmark scripts share: the plain baselines' compilers and the last step of a figure.

    from parts import inductor, save_figure     # benchmarks/ is on sys.path when a script there runs
"""

from __future__ import annotations

from pathlib import Path

import torch


def inductor(cpp_wrapper: bool):
    """Plain Inductor, with or without its C++ wrapper (what concurrent mode's segments use on CPU)."""
    from torch._inductor.compile_fx import compile_fx

    def compile_(gm, example_inputs):
        with torch._inductor.config.patch({"cpp_wrapper": cpp_wrapper}):
            return compile_fx(gm, example_inputs)

    return compile_


def save_figure(fig, path: Path, title: str) -> None:
    """Title, lay out, write as PNG and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
