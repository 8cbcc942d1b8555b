"""The eager side: the model object, with module hooks and no FX.

    reference.py    cqil_reference / cqil_semantics: the semantics, the oracle the backend is tested against
    replay.py       the original's block outputs recorded once, replayed up to a plan's first group
    quality.py      perplexity under a plan or with blocks removed, agreement, in-context copying
    similarity.py   block-input similarity (the paper's signal), SimilarityReport, heatmaps
    correction.py   closed-form group corrections fitted on calibration activations
    distill.py      recover / distill_plan: quality recovery by distillation (LoRA on peft)

Planning measures plans with these (:mod:`cqil_fx.planning.meter`); the quality
study behind ``cqil-fx eval`` is :mod:`cqil_fx.tools.study`.
"""
