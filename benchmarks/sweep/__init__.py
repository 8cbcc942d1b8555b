"""The parts of benchmarks/gpu_sweep.py (its docstring says what the sweep measures and how to run it).

    shapes.py     the model shapes, their random-weight models, the sweep's plans and their ideals
    work.py       what a part (GPU or many-core CPU) measures: its settings, columns and cells in priority order
    estimates.py  the guessed cost of a cell, against which the budget is kept
    columns.py    how each column compiles and is called: twins, clocks, static caches, thread counts
    runner.py     the sweep itself: cells in order within the budget, timed interleaved, the JSON
    report.py     rows and ratios from the timings, the printout, the plot and the dry run
"""
