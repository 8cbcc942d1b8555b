"""The graph side: what runs on the graph Dynamo captured.

    backend.py      CQILBackend: plan_graph -> apply_plan -> place or segment -> inner compiler
    rewrite.py      plan_graph (find blocks, choose the plan), apply_plan (the rewrite passes in order)
    calibration.py  planning on copies of the captured graph (GraphCalibration, search_graph_plan)
    executor.py     mode="concurrent": ConcurrentProgram, CudaGraphProgram
    omp_team.py     members as one parallel region of the process's OpenMP runtime
    distributed.py  mode="spmd": the ranks' group, agreement, the process-group transport, weights per rank
    shm.py          mode="spmd": the shared-memory transport between CPU ranks on one host

Nothing here imports the eager reference (:mod:`cqil_fx.eager`).
"""
