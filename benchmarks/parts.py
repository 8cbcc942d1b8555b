"""What several benchmark scripts share: the plain baselines' compilers, a measurement in a fresh Python
process, and the last step of a figure.

    from parts import inductor, python_child, save_figure     # benchmarks/ is on sys.path when a script there runs
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch


def inductor(cpp_wrapper: bool):
    """Plain Inductor, with or without its C++ wrapper (what concurrent mode's segments use on CPU)."""
    from torch._inductor.compile_fx import compile_fx

    def compile_(gm, example_inputs):
        with torch._inductor.config.patch({"cpp_wrapper": cpp_wrapper}):
            return compile_fx(gm, example_inputs)

    return compile_


def python_child(what: str, code: str, *args: str, env: dict[str, str], show_stderr: bool = False) -> str:
    """Run ``python -c code *args`` in a fresh process and return the last line it printed; a failure
    ends the benchmark naming ``what`` (with the child's stderr, unless it went to the terminal)."""
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                          stderr=None if show_stderr else subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed (exit {done.returncode})" + (f":\n{done.stderr[-4000:]}" if done.stderr else ""))
    return done.stdout.strip().splitlines()[-1]


def save_figure(fig, path: Path, title: str) -> None:
    """Title (wrapped to the figure's width), lay out, write as PNG and close ``fig``."""
    import textwrap

    import matplotlib.pyplot as plt

    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 14)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
