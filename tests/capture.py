"""Capture the FX graph Dynamo hands a backend, for tests that look at graphs."""

import torch


def capture_graph(model, *args, **kwargs) -> tuple[torch.fx.GraphModule, list]:
    """The (single) graph and example inputs Dynamo produces for ``model(*args, **kwargs)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]
