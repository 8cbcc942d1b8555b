"""Block discovery on Dynamo graphs of several HF families, and the module-stack helper."""

import pytest
import torch

from passes import UnrecognisedBlockError, find_blocks
from passes.module_stack import LayerRef, layer_of, normalise_path
from cqil_fx.inspect import capture_graph
from cqil_fx.reference import decoder_layers

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
