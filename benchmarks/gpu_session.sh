#!/usr/bin/env bash
# One device call (about ten minutes) on the GPU machine of docs/notes/gpu-sweep.md (one GPU, 16 cores).
#
#   bash benchmarks/gpu_session.sh gpu OUT [SECONDS] [GPU_SWEEP_ARGS...]
#   bash benchmarks/gpu_session.sh cpu OUT [SECONDS]
#
# gpu: benchmarks/gpu_sweep.py's GPU part alone on the machine, with the given arguments (e.g.
#      --models llama-3.1-8b --batches 1 8) and --budget-s SECONDS - 60; tests/test_gpu.py after it
#      if at least four minutes are left.
# cpu: the 16-core CPU part's decode for the SmolLM2 and Qwen2.5-0.5B shapes, the original on 16, 8 and
#      4 threads, CQIL P2 on 16 and 8 (members on 8 and 4) and the ideal on 16 and 8 (COLUMNS below).
#      A cold CPU compile is mostly one g++ per graph (about a minute each), so fourteen compiles one
#      after the other would not fit: first one process per shape and column compiles (--compile-only),
#      all at once, filling Inductor's on-disk caches; then one process per shape compiles again from
#      those caches and times its columns interleaved.  The two timed processes time one after the other
#      (--ready, --wait-for), so every timed call has the machine to itself.
#
# Every step has a timeout inside SECONDS (default 570), so the script always ends and leaves what it
# measured under OUT: gpu/gpu_sweep.json and gpu.log, or cpu-SHAPE/cpu_sweep.json and cpu.log.  The PNGs
# are removed (the device tool brings back eight files at most); `python benchmarks/gpu_sweep.py --replot
# FILE.json` draws them again.
set -u
part=${1:?usage: gpu_session.sh gpu|cpu OUT [SECONDS] [GPU_SWEEP_ARGS...]}
out=${2:?usage: gpu_session.sh gpu|cpu OUT [SECONDS] [GPU_SWEEP_ARGS...]}
total=${3:-570}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
left() { echo $(( total - SECONDS )); }
log="$out/$part.log"
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$log" 2>&1

case $part in
gpu)
    timeout $(( total - 30 )) python3 benchmarks/gpu_sweep.py --out "$out/gpu" --budget-s $(( total - 60 )) "$@" >> "$log" 2>&1
    echo "gpu sweep exit $? at ${SECONDS} s" >> "$log"
    if (( $(left) > 240 )); then
        timeout $(( $(left) - 10 )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >> "$log" 2>&1
        echo "tests/test_gpu.py exit $? at ${SECONDS} s" >> "$log"
    fi
    ;;
cpu)
    COLUMNS=(inductor-cpp inductor-cpp@8 inductor-cpp@4 'cqil-concurrent|P2' 'cqil-concurrent|P2@8' 'ideal|P2' 'ideal|P2@8')
    SHAPES=(smollm2-135m qwen2.5-0.5b)
    flags=$(mktemp -d)
    sweep() {  # TAG ARGS...: one CPU process, its lines prefixed with TAG
        local tag=$1
        shift
        timeout $(( $(left) - 10 )) python3 benchmarks/gpu_sweep.py --cpu --workloads decode --budget-s 100000 "$@" \
            2>&1 | sed -u "s/^/[$tag] /" >> "$log"
    }
    for shape in "${SHAPES[@]}"; do
        for column in "${COLUMNS[@]}"; do
            sweep "warm $shape $column" --compile-only --models "$shape" --columns "$column" --out "$flags/warm" &
        done
    done
    wait
    echo "caches filled at ${SECONDS} s" >> "$log"
    # the first times once the second has compiled, the second once the first has ended
    (sweep "${SHAPES[0]}" --models "${SHAPES[0]}" --columns "${COLUMNS[@]}" --out "$out/cpu-${SHAPES[0]}" \
        --ready "$flags/ready-0" --wait-for "$flags/ready-1"; touch "$flags/done-0") &
    sweep "${SHAPES[1]}" --models "${SHAPES[1]}" --columns "${COLUMNS[@]}" --out "$out/cpu-${SHAPES[1]}" \
        --ready "$flags/ready-1" --wait-for "$flags/done-0"
    touch "$flags/ready-1"  # if the second ended without compiling, the first must not wait for it for good
    wait
    echo "cpu part ended at ${SECONDS} s" >> "$log"
    ;;
*)
    echo "unknown part $part: gpu or cpu" >&2
    exit 2
    ;;
esac
rm -f "$out"/*/*.png
