#!/usr/bin/env bash
# Run the kernel tests compiled on a GPU machine, in parallel shards: compiling the Triton variants is
# CPU-bound and one process takes over five minutes. Usage: bash scripts/gpu_kernel_tests.sh [SHARDS] [LOG_DIR]
set -uo pipefail
shards=${1:-4}
logs=${2:-/tmp/gpu_kernel_tests}
mkdir -p "$logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pytest -q --co tests/test_kernels.py | grep '::' >"$logs/ids"
for i in $(seq 0 $((shards - 1))); do
    awk -v n="$shards" -v i="$i" 'NR % n == i' "$logs/ids" >"$logs/shard$i"
    xargs -d '\n' -a "$logs/shard$i" python3 -m pytest -q -p no:cacheprovider >"$logs/shard$i.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 3 "$logs"/shard*.log
echo "collected $(wc -l <"$logs/ids") kernel tests; shards exit status $status"
exit $status
