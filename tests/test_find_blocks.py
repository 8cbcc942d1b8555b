"""Block discovery on Dynamo graphs of several HF families, and the module-stack helper."""

import pytest
import torch

from cqil_fx.errors import UnrecognisedBlockError
from cqil_fx.passes import find_blocks
from cqil_fx.passes.module_stack import LayerRef, layer_of, normalise_path
from cqil_fx.tools.inspect import capture_graph
from cqil_fx.stack import decoder_layers, without_blocks
from cqil_fx.tools.generation import compiled_twin

from tiny_models import FAMILIES, LAYERS, tiny_model, tokens


@pytest.mark.parametrize(
    ("path", "normalised"),
    [
        ("L['args'][0].model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
        ("L['self'].transformer.h.3", "transformer.h.3"),
        ("L['self'].model.layers[12].mlp", "model.layers.12.mlp"),
        ("L['self']._modules['model']._modules['layers']._modules['4']", "model.layers.4"),
        ("L['fn'].__self__.model.norm", "model.norm"),
    ],
)
def test_normalise_path(path, normalised):
    assert normalise_path(path) == normalised


def test_layer_of_picks_the_outermost_list_element():
    node = torch.fx.Graph().placeholder("x")
    node.meta["nn_module_stack"] = {
        "a": ("L['self'].model", object),
        "b": ("L['self'].model.layers.7", object),
        "c": ("L['self'].model.layers.7.mlp.experts.3", object),
    }
    assert layer_of(node) == LayerRef("model.layers", 7)
    node.meta["nn_module_stack"] = {"a": ("L['self'].model.norm", object)}
    assert layer_of(node) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finds_every_block_with_its_residual_path(family):
    model = tiny_model(family)
    gm = capture_graph(model, tokens(), use_cache=False)
    blocks = find_blocks(gm)
    kind = FAMILIES[family][3]
    assert [b.index for b in blocks] == list(range(LAYERS))
    assert {b.kind for b in blocks} == {kind}
    layers = decoder_layers(model)
    for block, layer in zip(blocks, layers):
        assert block.path.endswith(f".{block.index}")
        assert block.param_count == sum(p.numel() for p in layer.parameters())
        assert len(block.residual) == (2 if kind == "sequential" else 1)
        assert all(n in block.nodes for n in block.residual)
        if kind == "sequential":
            mid, out = block.residual
            assert set(mid.args[:2]) == {block.input, block.attention}
            assert set(out.args[:2]) == {mid, block.mlp}
            assert block.mlp_inputs and all(mid in u.args for u in block.mlp_inputs)
        else:
            assert block.attention is None and set(block.output.args[:2]) == {block.input, block.mlp}
    # Consecutive blocks are chained through the residual stream.
    assert all(b.input is a.output for a, b in zip(blocks, blocks[1:]))
    # Model-wide nodes (embedding, rotary tables, final norm, head) belong to no block.
    in_blocks = {n for b in blocks for n in b.nodes}
    assert blocks[0].input not in in_blocks
    assert "Block(0, " in repr(blocks[0])


def test_graph_without_layers_has_no_blocks():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    gm = capture_graph(mlp, torch.randn(2, 4))
    assert find_blocks(gm) == []


def test_partial_stack_is_refused():
    model = tiny_model("llama")
    # A graph of layers 3..4 only, as after a graph break inside the stack.
    layers = decoder_layers(model)

    class Fragment(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity()] * 3 + [layers[3], layers[4]])

        def forward(self, h, position_embeddings):
            for layer in self.layers[3:]:
                h = layer(h, attention_mask=None, position_embeddings=position_embeddings)
            return h

    h = torch.randn(1, 5, 32)
    cos_sin = model.model.rotary_emb(h, torch.arange(5)[None])
    gm = capture_graph(Fragment(), h, cos_sin)
    with pytest.raises(UnrecognisedBlockError, match=r"holds layers \[3, 4\]"):
        find_blocks(gm)


class _CachedLayer(torch.nn.Module):
    """A pre-norm-shaped block that writes a cache in place, like a static KV cache."""

    def __init__(self):
        super().__init__()
        self.attn, self.mlp = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, h, cache, counter, position):
        cache.index_copy_(0, position, h)  # its own cache ...
        counter.add_(1)  # ... and its own length counter, as transformers' StaticLayer does
        mid = h + self.attn(h) * cache.sum()
        return mid + self.mlp(mid)


class _CachedStack(torch.nn.Module):
    def __init__(self, shared_cache: bool):
        super().__init__()
        self.layers = torch.nn.ModuleList([_CachedLayer() for _ in range(3)])
        self.shared = shared_cache

    def forward(self, h, caches, counters, position):
        for i, layer in enumerate(self.layers):
            cache = caches[0] if self.shared else caches[i]
            h = layer(h, cache, counters[i], position)
        return h * 2


def _cached_stack_graph(shared_cache: bool):
    caches = [torch.zeros(4, 4) for _ in range(3)]
    counters = [torch.zeros((), dtype=torch.long) for _ in range(3)]
    return capture_graph(_CachedStack(shared_cache), torch.randn(1, 4), caches, counters, torch.tensor([0]))


def test_cache_writes_belong_to_their_block():
    blocks = find_blocks(_cached_stack_graph(shared_cache=False))
    for block in blocks:
        assert [n.target for n in block.cache_writes] == ["index_copy_", "add_"]
        assert all(n in block.nodes for n in block.cache_writes)
    written = [b.cache_writes[0].args[0] for b in blocks]
    assert len(set(written)) == 3  # three caches, one per block


def test_a_cache_written_by_one_block_and_read_by_another_is_refused():
    with pytest.raises(UnrecognisedBlockError, match=r"block 0 writes .* in place .* blocks \[1, 2\] read it"):
        find_blocks(_cached_stack_graph(shared_cache=True))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_without_blocks_leaves_the_model_and_its_twins_whole(family):
    """The benchmarks' ideal: the blocks removed from a copy only (a shallow copy of a module shares
    its child table, and the first version of this helper removed them from every twin too)."""
    model = tiny_model(family)
    twin = compiled_twin(model, "eager")
    ideal = without_blocks(model, [2, 5])
    kept = decoder_layers(ideal)
    assert len(kept) == LAYERS - 2 and len(decoder_layers(model)) == len(decoder_layers(twin)) == LAYERS
    assert kept[2] is decoder_layers(model)[3]
    ids = tokens()
    with torch.no_grad():
        short = ideal(ids, use_cache=False).logits
        whole = model(ids, use_cache=False).logits
    assert not torch.allclose(short, whole)
    layers = decoder_layers(model)
    removed = [layers[2], layers[5]]
    try:  # the same model with the two blocks taken out by hand
        del layers[5], layers[2]
        with torch.no_grad():
            torch.testing.assert_close(model(ids, use_cache=False).logits, short)
    finally:
        layers.insert(2, removed[0])
        layers.insert(5, removed[1])
    assert len(decoder_layers(model)) == LAYERS
