#!/usr/bin/env bash
# One device-machine call per stage, after the GPU bundle is staged (see ../shared/tools/gpu-vllm-bundle):
#
#   source .gpu/p2/setup.sh && bash scripts/gpu-run.sh STAGE
#
# Stages (each fits one <= 10 min call on a 2-GPU H100 host; lanes run side by side, one GPU each):
#   check       GPU tests, host-overhead / prefill benchmarks (GPU 0); accuracy harness (GPU 1);
#               carry .benchdata (python3 -m benchmarks.prepare_text --compress) and .gpu/fi
#   throughput  benchmarks/serving/throughput.py, both workloads, vLLM's default compilation
#   tp          benchmarks/tp/check.py (needs 2 GPUs)
# Every lane's log and every results JSON come back in $OUT/results.tgz (the device returns at most 8 files);
# $OUT/summary.txt lists each lane's exit code and duration.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu-run.sh check|throughput|tp}
OUT=${OUT:-/tmp/kvquant-gpu-out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export VLLM_WORKER_MULTIPROC_METHOD=spawn NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
t0=$(date +%s)

# lane NAME GPUS SECONDS CMD...: run CMD in the background on GPUS, killed after SECONDS.
lane() {
  local name=$1 gpus=$2 limit=$3
  shift 3
  (
    summary=$OUT/summary.txt
    # Results stay in benchmarks/results (tarred below): no per-file copies into $OUT (8 files come back).
    unset OUT
    export CUDA_VISIBLE_DEVICES=$gpus
    s=$(date +%s)
    timeout -k 10 "$limit" bash -c "$*" >"$LOGS/$name.log" 2>&1
    echo "lane $name (gpu $gpus): rc=$? in $(($(date +%s) - s)) s" >>"$summary"
  ) &
}
second_gpu() { if [ "$NGPU" -ge 2 ]; then echo 1; else echo 0; fi; }

case $stage in
check)
  lane tests 0 570 "python3 -P -m pytest -m gpu -q -p no:cacheprovider \
      tests/test_quantize_cache.py tests/test_decode_attention.py tests/test_prefill_attention.py \
      tests/test_prefill_runner.py tests/test_decode_kernels_gpu.py tests/test_full_graphs.py \
      tests/test_online_scales.py tests/test_backend_gpu.py tests/test_serve.py ${KVQ_EXTRA_TESTS:-}; \
    python3 -m benchmarks.kernels.host_overhead; python3 -m benchmarks.kernels.prefill"
  [ "$NGPU" -ge 2 ] || wait
  # The accuracy harness alone on the second GPU (it budgets itself: --time-budget, default 390 s);
  # KVQ_DECODE=1 also runs the decode benchmark (~2.5 min with FlashInfer's JIT) after it.
  lane bench "$(second_gpu)" 570 "python3 -m benchmarks.accuracy.run ${KVQ_ACCURACY_ARGS:-}; \
    if [ \"${KVQ_DECODE:-0}\" = 1 ]; then python3 -m benchmarks.kernels.decode ${KVQ_DECODE_ARGS:-}; fi"
  ;;
throughput)
  # Rows of one workload split over the two GPUs of this host, run at the same time; kvquant and
  # vLLM's fp8 FLASH_ATTN share GPU 0 so that their ratio is measured on one card.
  wl=${KVQ_WORKLOAD:-1024x512}
  n=${KVQ_REQUESTS:-256}
  common="--compile --input-len ${wl%x*} --output-len ${wl#*x} --num-requests $n --time-budget 540 --child-timeout 300"
  lane "thr-$wl-a" 0 570 "python3 -m benchmarks.serving.throughput $common \
      --configs vllm-fp8-flash,kvquant-fp8,kvquant-int8 --out benchmarks/results/throughput-part-a-$wl.json"
  lane "thr-$wl-b" "$(second_gpu)" 570 "python3 -m benchmarks.serving.throughput $common \
      --configs vllm-bf16,vllm-int8-per-token-head,vllm-fp8-triton --out benchmarks/results/throughput-part-b-$wl.json"
  ;;
tp)
  lane tp "$(seq -s, 0 $((NGPU - 1)))" 560 "python3 -m benchmarks.tp.check ${KVQ_TP_ARGS:-}"
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
wait
echo "stage $stage: $(($(date +%s) - t0)) s on $NGPU GPU(s)" >>"$OUT/summary.txt"
tar -czf "$OUT/results.tgz" benchmarks/results "$LOGS" 2>/dev/null
cat "$OUT/summary.txt"
for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 25 "$f"; done
