#!/usr/bin/env bash
# One lease of the GPU machine (one GPU, 16 cores) in one command of about ten minutes
# (docs/gpu-sweep.md, "One lease"):
#
#   bash benchmarks/gpu_session.sh OUT [SECONDS] [GPU_BUDGET_S]
#
# 1. The GPU part of benchmarks/gpu_sweep.py on the shapes the first run did not reach (Qwen2.5-0.5B
#    and the 8B shape, batch 1 and 8) within GPU_BUDGET_S (default 300), then tests/test_gpu.py.
# 2. At the same time, the CPU part in three processes (SmolLM2 P2, Qwen2.5-0.5B P2, SmolLM2 P4; decode;
#    the baseline inductor-cpp, concurrent, ideal), which *compile* while the GPU works: Inductor's
#    CPU compile is mostly one g++ per graph, minutes of one core each, so compiling alone would not
#    fit in a lease.  Each waits (--wait-for) before *timing*: the first until the GPU work is done,
#    the others until the one before has ended, so every timed call has the machine to itself.
#
# Every step has a timeout inside SECONDS (default 570), so the script always ends and leaves what it
# measured: OUT/gpu/gpu_sweep.json, OUT/cpu-*/cpu_sweep.json, OUT/gpu.log (sweep and tests),
# OUT/cpu.log (the three CPU processes, lines prefixed).  The PNGs are removed (the device tool brings
# back eight files at most); `python benchmarks/gpu_sweep.py --replot FILE.json` draws them again.
set -u
out=${1:?usage: gpu_session.sh OUT [SECONDS] [GPU_BUDGET_S]}
total=${2:-570}
gpu_budget=${3:-300}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
flags=$(mktemp -d)
mkdir -p "$out"
left() { echo $(( total - SECONDS )); }

{ nvidia-smi -L; nproc; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$out/gpu.log" 2>&1

cpu_part() {  # NAME WAIT_FOR ARGS...: one CPU process, its lines prefixed; touches NAME when it ends
    local name=$1 wait=$2
    shift 2
    timeout $(( $(left) - 10 )) python3 benchmarks/gpu_sweep.py --cpu --workloads decode --out "$out/$name" \
        --wait-for "$flags/$wait" --budget-s $(( $(left) - 20 )) "$@" 2>&1 | sed -u "s/^/[$name] /" >> "$out/cpu.log"
    touch "$flags/$name"
}
cpu_part cpu-smollm2-p2 gpu --models smollm2-135m --columns inductor-cpp 'cqil-concurrent|P2' 'ideal|P2' &
cpu_part cpu-qwen-p2 cpu-smollm2-p2 --models qwen2.5-0.5b --columns inductor-cpp 'cqil-concurrent|P2' 'ideal|P2' &
cpu_part cpu-smollm2-p4 cpu-qwen-p2 --models smollm2-135m --columns inductor-cpp 'cqil-concurrent|P4' 'ideal|P4' &

timeout $(( gpu_budget + 60 )) python3 benchmarks/gpu_sweep.py --out "$out/gpu" --models qwen2.5-0.5b llama-3.1-8b \
    --batches 1 8 --budget-s "$gpu_budget" >> "$out/gpu.log" 2>&1
echo "gpu sweep exit $? at ${SECONDS} s" >> "$out/gpu.log"
timeout $(( $(left) > 200 ? 150 : $(left) / 3 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >> "$out/gpu.log" 2>&1
echo "tests/test_gpu.py exit $? at ${SECONDS} s" >> "$out/gpu.log"
touch "$flags/gpu"
wait
echo "cpu part ended at ${SECONDS} s" >> "$out/cpu.log"
rm -f "$out"/*/*.png
