"""The eager side: the model object, with module hooks and no FX.

    reference.py    cqil_reference / cqil_semantics: the semantics, the oracle the backend is tested against
    quality.py      perplexity under a plan or with blocks removed
    similarity.py   block-input similarity (the paper's signal), heatmaps
    planner.py      plan_auto: the budgeted search measured on the eager model
    distill.py      recover / distill_plan: quality recovery by distillation
    study.py        the quality study behind ``cqil-fx eval``
"""
