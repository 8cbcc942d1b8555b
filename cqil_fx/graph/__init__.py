"""The runtime: what compiles and runs the graph Dynamo captured.

    backend.py      CQILBackend: plan -> rewrite -> place -> compile -> guard, the same for every mode
    report.py       CompileReport: what the backend did with one graph
    modes/          one module per execution mode (local, concurrent, spmd) behind one protocol;
                    execution_mode: "auto" as a rule over cqil_fx.config.MODE_TABLE
    executor.py     mode="concurrent": ConcurrentProgram, CudaGraphProgram
    omp_team.py     members as one parallel region of the process's OpenMP runtime
    distributed.py  mode="spmd": the ranks' group, agreement, the process-group transport, weights per rank
    shm.py          mode="spmd": the shared-memory transport between CPU ranks on one host
    weights.py      mode="spmd": a rank's weights loaded or cut to what it computes

The runtime imports planning (:mod:`cqil_fx.planning`) and the passes;
nothing here imports the eager reference (:mod:`cqil_fx.eager`).
"""
