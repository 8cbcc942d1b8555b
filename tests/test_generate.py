"""Generation with a KV cache: ``model.generate()`` through a compiled ``forward``.

The oracle is independent of any cache: greedy decoding that recomputes the
whole sequence at every step, with no cache, under the eager CQIL hooks
(:func:`cqil_fx.eager.reference.cqil_semantics`).  A member's K/V written to the
cache are computed from its group input x, so decoding with a cache gives the
same logits.  Dynamo tracing of the HF forward dominates the time here (a few
seconds per graph on two cores, more for SmolLM2's 30 blocks), so the tiny
models have 4 blocks and each test checks several things on one compile.
"""

import functools

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

from cqil_fx import CQILConfig, make_backend
from cqil_fx.tools.generation import compiled_twin
from cqil_fx.eager.reference import cqil_semantics
from cqil_fx.stack import decoder_layers

from conftest import relative_error
from tiny_models import _COMMON, FAMILIES, tokens

TOLERANCE = 1e-4  # per decode step, relative, float32
NEW_TOKENS = 4
PAD = 0
LAYERS = 4  # half the usual tiny stack: Dynamo's tracing time grows with the layers
GROUPS = [[1, 2]]  # one group in the middle; blocks 0 and 3 run alone


@functools.cache
def small_model(family: str) -> torch.nn.Module:
    """A 4-block float32 model of ``family`` (like tiny_models.tiny_model); cached, never modify it."""
    config_cls, model_cls, kwargs, _ = FAMILIES[family]
    layers_field = "n_layer" if "n_layer" in kwargs else "num_hidden_layers"
    config = getattr(transformers, config_cls)(**_COMMON, **{**kwargs, layers_field: LAYERS})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    model.requires_grad_(False)
    return model


def left_padded(batch: int, length: int, pads: tuple[int, ...], seed: int = 1):
    """Token ids and attention mask of ``batch`` prompts, row i left-padded with ``pads[i]`` tokens."""
    ids = tokens(batch=batch, length=length, seed=seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = PAD, 0
    return ids, mask


def greedy_without_cache(model, plan, ids, mask, new_tokens=NEW_TOKENS):
    """(tokens, logits of each step): greedy decoding that recomputes everything, no cache."""
    logits = []
    with cqil_semantics(model, plan), torch.no_grad():
        for _ in range(new_tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() numbers them
            step = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids, torch.stack(logits, dim=1)


def compiled_copy(model, config):
    """A shallow copy of ``model`` (weights shared) whose ``forward`` goes through the cqil backend.

    The tiny models are cached across tests, so the compiled forward and the
    generation settings go on a copy.
    """
    backend = make_backend(config)
    return compiled_twin(model, backend), backend


def generate(model, ids, mask, new_tokens=NEW_TOKENS, **kwargs):
    kwargs.setdefault("cache_implementation", "static")
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


def assert_same_generation(actual, expected):
    (tokens_a, logits_a), (tokens_e, logits_e) = actual, expected
    assert torch.equal(tokens_a, tokens_e)
    for step in range(logits_e.shape[1]):
        assert relative_error(logits_a[:, step], logits_e[:, step]) <= TOLERANCE, f"decode step {step}"


def assert_not_the_original(model, config, ids, mask):
    """CQIL changes these logits by far more than rounding, so the comparisons are not vacuous."""
    plain = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
    with cqil_semantics(model, config):
        cqil = model(ids, attention_mask=mask, use_cache=False).logits[:, -1]
    assert relative_error(cqil, plain) > 0.05


def assert_cache_writes_kept(report, model):
    """The graph was rewritten; every block keeps its K and V writes, and a group member's
    writes are computed from the group input, not from the member before it."""
    assert report.fallback is None and report.rewrites
    assert len(report.blocks) == len(decoder_layers(model))
    by_index = {b.index: b for b in report.blocks}
    kv_writes = {}
    for block in report.blocks:
        kv_writes[block.index] = [n for n in block.cache_writes if "index_copy_" in str(n.target)]
        assert len(kv_writes[block.index]) == 2, block  # K and V (the rest: the length counter's add_)
        assert set(block.cache_writes) <= set(block.nodes)
    for rewrite in report.rewrites:
        for before, member in zip(rewrite.members, rewrite.members[1:]):
            earlier = set(by_index[before].nodes)
            for write in kv_writes[member]:
                sources = ancestors(write)
                assert rewrite.input in sources and not sources & earlier, write


def ancestors(node):
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def test_static_cache_generate_and_recompilation():
    """LLaMA, batch 2 with left-padded prompts and an attention mask.  One call compiles
    prefill and decode; a new prompt length recompiles only the prefill, once, as a
    dynamic-length graph (the cache is sized for every call with
    generation_config.max_cache_len); later lengths reuse it."""
    base = small_model("llama")
    config = CQILConfig(groups=GROUPS, bypass=1, inner="eager", mode="local")  # the rewrite's structure
    model, backend = compiled_copy(base, config)
    model.generation_config.max_cache_len = 32
    new_graphs = []
    for length in (7, 9, 4):
        ids, mask = left_padded(batch=2, length=length, pads=(0, 3), seed=length)
        before = len(backend.reports)
        assert_same_generation(generate(model, ids, mask), greedy_without_cache(base, config, ids, mask))
        new_graphs.append(len(backend.reports) - before)
    assert new_graphs == [2, 1, 0]
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    for report in backend.reports:
        assert_cache_writes_kept(report, base)
    assert_not_the_original(base, config, ids, mask)


@pytest.mark.parametrize(
    ("family", "bypass", "batch", "inner"),
    [
        # Sliding-window cache layers: an int length counter leaves the graph.  AOTAutograd
        # functionalizes the cache writes, as it does under Inductor.
        ("mistral", 1, 2, "aot_eager"),
        ("phi", 0, 1, "eager"),  # parallel residual; one prompt
    ],
)
def test_static_cache_generate_other_families(family, bypass, batch, inner):
    base = small_model(family)
    config = CQILConfig(groups=GROUPS, bypass=bypass, inner=inner, mode="local")  # the rewrite's structure
    ids, mask = left_padded(batch=batch, length=7, pads=(0, 3)[:batch])
    model, backend = compiled_copy(base, config)
    assert_same_generation(generate(model, ids, mask), greedy_without_cache(base, config, ids, mask))
    assert_not_the_original(base, config, ids, mask)
    assert len(backend.reports) == 2  # prefill and decode
    for report in backend.reports:
        assert_cache_writes_kept(report, base)


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_concurrent_mode_generate(inner):
    """Members of a group run on worker threads; each writes its own layer's cache (an input
    mutation of its segment, which AOTAutograd copies back; with Inductor, inside the segment's
    C++ wrapper)."""
    base = small_model("llama")
    config = CQILConfig(groups=GROUPS, bypass=1, inner=inner, mode="concurrent")
    ids, mask = left_padded(batch=2, length=7, pads=(2, 0))
    model, backend = compiled_copy(base, config)
    assert_same_generation(generate(model, ids, mask), greedy_without_cache(base, config, ids, mask))
    assert counters["cqil"]["segments"] > 0 and counters["cqil"]["concurrent_fallbacks"] == 0


def test_dynamic_cache_generate():
    """The default cache (DynamicCache): prefill, a static first decode step, then one
    dynamic-length decode graph, all rewritten (the cache concatenation stays in its block)."""
    base = small_model("gpt2")
    config = CQILConfig(groups=GROUPS, bypass=1, inner="eager")
    ids, mask = left_padded(batch=2, length=7, pads=(0, 2))
    model, backend = compiled_copy(base, config)
    actual = generate(model, ids, mask, cache_implementation=None)
    assert_same_generation(actual, greedy_without_cache(base, config, ids, mask))
    assert len(backend.reports) == 3 and all(r.fallback is None for r in backend.reports)


@pytest.mark.real_model
def test_smollm2_generate_equals_reference(smollm2):
    """Real weights and tokenizer: two prompts, the shorter left-padded, 3 new tokens."""
    model, tokenizer = smollm2
    config = CQILConfig(start=20, end=28, parallel=2, bypass=1, inner="eager", mode="local")
    enc = tokenizer(["The capital of France is", "Water boils at a temperature of"],
                    return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc.input_ids, enc.attention_mask
    assert not mask.all()  # the first prompt is left-padded
    compiled, backend = compiled_copy(model, config)
    actual = generate(compiled, ids, mask, new_tokens=3)
    assert_same_generation(actual, greedy_without_cache(model, config, ids, mask, new_tokens=3))
    assert len(backend.reports) == 2
    for report in backend.reports:
        assert_cache_writes_kept(report, model)
