#!/usr/bin/env bash
# Three device calls back to back, one lease (15 minutes of device time, the start included): the user's path
# on SmolLM2's real weights (benchmarks/gpu_user_path.py) and the sweep's missing cells (benchmarks/gpu_sweep.py
# --work missing).  The weights travel in three parts (benchmarks/smollm2_transfer.py: 87.5 MB packed, the
# tree about 22.5 MB, a call at most 64 MiB); each call keeps its part in /tmp, where the next finds it while
# the machine is held (30 s idle at most between calls).
#
# Here, first (once; the parts and the wheel are ignored files):
#   python benchmarks/smollm2_transfer.py pack       # .xfer/1 .xfer/2 .xfer/3 (about 2.5 min on 2 cores)
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.18.0
#   python benchmarks/smollm2_transfer.py sizes      # MiB per call, the working tree included: each must fit
#   bash benchmarks/gpu_session_user.sh dry /tmp/user-dry   # the same steps on this CPU, tiny (about 2 min)
#
# The device calls, in this order, with nothing between them (issue all three in one block of tool calls; if
# the tool answers 'already running' to one, issue it again at once):
#   1. run(command="bash benchmarks/gpu_session_user.sh 1 $OUT", carry=[".xfer/1"], timeout_s=165)
#      ~140 s: keeps part 1; the sweep's batch-8 decode of the SmolLM2 shape, then P4 on the Llama-3.2-1B
#      shape if it fits (OUT/call1.log, OUT/sweep1/gpu_sweep.json)
#   2. run(command="bash benchmarks/gpu_session_user.sh 2 $OUT", carry=[".xfer/2"], timeout_s=190)
#      ~165 s: keeps part 2; the Llama-3.1-8B shape, all 32 layers, batch-1 decode (OUT/sweep2/gpu_sweep.json)
#   3. run(command="bash benchmarks/gpu_session_user.sh 3 $OUT", carry=[".xfer/3", ".whl"], timeout_s=420)
#      ~390 s: joins the parts, installs torchao, the user's path (OUT/call3.log, OUT/user/user_path.json)
#   then give_back.  Expected device time: start 60-120 s + 140 + 165 + 390 + transfers and gaps, about
#   14 minutes: no room for a rerun of the same size, nor for tests/test_gpu.py (about 4 minutes; a later
#   lease's).  Each call also keeps its files in /tmp/cqil_lease, and call 3 brings back all six (call1.log,
#   sweep1/gpu_sweep.json, call2.log, sweep2/gpu_sweep.json, call3.log, user/user_path.json): copy them into
#   the repository after give_back, not between the calls.
# If the machine was given back between calls (a new start, a part missing), call 3 says so and runs the
# user's path on random weights of SmolLM2's shape instead (--fallback-random); its JSON's meta says which.
#
#   bash benchmarks/gpu_session_user.sh 1|2|3 OUT [SECONDS]
#   bash benchmarks/gpu_session_user.sh dry OUT          # here, no GPU: every step in its tiny CPU form
set -u
call=${1:?usage: gpu_session_user.sh 1|2|3|dry OUT [SECONDS]}
out=${2:?usage: gpu_session_user.sh 1|2|3|dry OUT [SECONDS]}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
case $call in 1) total=${3:-140} ;; 2) total=${3:-165} ;; 3) total=${3:-390} ;; dry) total=${3:-600} ;;
    *) echo "unknown call $call: 1, 2, 3 or dry" >&2; exit 2 ;; esac
log="$out/call$call.log"
keep=${CQIL_LEASE_KEEP:-/tmp/cqil_lease}  # what this call wrote, for call 3 to bring back
left() { echo $(( total - SECONDS )); }
py=${PYTHON:-python3}
site=${CQIL_WHEEL_TARGET:-/tmp/site}  # where the carried wheels are installed
if [ "$call" = dry ]; then
    py=${PYTHON:-.venv/bin/python}
    export CQIL_XFER_STASH="$out/stash"  # not this machine's /tmp: others work here
    keep="$out/keep"
    sweep_args=(--cpu-small --batches 1 8)
    user_args=(--dry-run --phases generate)
else
    sweep_args=()
    user_args=(--fallback-random)
fi
{
    date
    nvidia-smi -L 2>/dev/null || echo "no GPU"
    echo "cores $(nproc)"
    $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    $py benchmarks/smollm2_transfer.py stash
} > "$log" 2>&1

sweep() {  # NAME SWEEP_ARGS...: the sweep's missing cells within what is left
    local name=$1
    shift
    timeout $(( $(left) - 10 )) $py benchmarks/gpu_sweep.py --work missing --workloads decode \
        --budget-s $(( $(left) - 20 )) --out "$out/$name" "${sweep_args[@]}" "$@" >> "$log" 2>&1
    echo "sweep $name exit $? at ${SECONDS} s" >> "$log"
    rm -f "$out/$name"/*.png
}

user_path() {
    if [ "$call" != dry ] && ls .whl/*.whl > /dev/null 2>&1; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            .whl/*.whl >> "$log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$site"
        echo "wheels installed: $(ls .whl) at ${SECONDS} s" >> "$log"
    fi
    timeout $(( $(left) - 5 )) $py benchmarks/gpu_user_path.py --out "$out/user" --budget-s $(( $(left) - 15 )) \
        "${user_args[@]}" >> "$log" 2>&1
    echo "user path exit $? at ${SECONDS} s" >> "$log"
}

case $call in
1) sweep sweep1 --models smollm2-135m llama-3.2-1b ;;
2) sweep sweep2 --models llama-3.1-8b --big-layers 32 ;;
3) user_path ;;
dry)
    sweep sweep1 --models tiny-llama
    sweep sweep2 --models tiny-qwen2
    user_path
    ;;
esac
echo "call $call ended at ${SECONDS} s" >> "$log"
mkdir -p "$keep"
cp -r "$out"/call*.log "$out"/sweep* "$out"/user "$keep"/ 2>/dev/null
if [ "$call" = 3 ]; then  # the earlier calls' files come back with this one
    cp -rn "$keep"/call1.log "$keep"/call2.log "$keep"/sweep1 "$keep"/sweep2 "$out"/ 2>/dev/null
fi
grep -h "parts held" "$log"
tail -n 25 "$log"
