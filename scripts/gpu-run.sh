#!/usr/bin/env bash
# One device-machine call per stage, after the GPU bundle is staged (see ../shared/tools/gpu-vllm-bundle):
#
#   source .gpu/p2/setup.sh && bash scripts/gpu-run.sh STAGE
#
# Every stage fits one <= 10 min call on ONE GPU (the lent single-H200 machines). Lanes of a
# stage run side by side; lane i gets GPU i mod (number of GPUs), so on one GPU they share it.
#   check       all GPU tests, six lanes on the same GPU (target <= 8 min on an H200; Triton
#               compiling on the host is most of the kernel lanes' time, so they split three ways):
#                 kernels-a, kernels-b, kernels-c: pytest -m gpu over the kernel / graph-capture test
#                 files (carry .gpu/fi: FlashInfer's JIT cache, else its decode kernels compile for minutes);
#                 engines: tests/test_backend_gpu.py (nine engines side by side, fixed KV bytes);
#                 serve: tests/test_serve.py + tests/test_serve_bad_input.py (one shared server);
#                 jit: tests/test_jit_warmup_gpu.py (three engines: no Triton JIT while serving);
#                 a skipped engine or serve test fails its lane (KVQUANT_FAIL_ON_SKIP=1). Each lane's
#                 pytest temp dir is /tmp/kvq-pytest/LANE; every *.log in it (each engine's and the
#                 server's output) comes back under logs/tmp/, also when a lane ran out of time
#   bench       benchmarks/kernels/host_overhead.py, benchmarks/kernels/prefill.py; KVQ_DECODE=1 adds
#               benchmarks/kernels/decode.py (~2.5 min with FlashInfer's JIT; carry .gpu/fi)
#   accuracy    benchmarks/accuracy/run.py (--time-budget, default 390 s; carry .benchdata)
#   serve-load  benchmarks/serving/serve_load.py for KVQ_SERVE_CONFIGS (default kvquant-fp8; the
#               second call: KVQ_SERVE_CONFIGS=vllm-fp8), KVQ_SERVE_ARGS extra flags. KVQ_SERVE_PHASE:
#               load (default: server, grid, checks; --no-trained-check), trained (the trained tiny
#               model's phase only, e.g. KVQ_SERVE_CONFIGS=kvquant-fp8,vllm-fp8 in a third call) or
#               all (both: does not fit one call for Llama-3-8B shapes). Writes
#               benchmarks/results/serve-load-<device>-<configs>[-trained].json; the server logs come
#               back under logs/tmp/serve-load. Merge the parts anywhere:
#               python3 -m benchmarks.serving.serve_load --merge A.json B.json C.json --out benchmarks/results/serve-load-nvidia-h200.json
#               Repeats, side by side: KVQ_SERVE_CONFIGS=kvquant-fp8,vllm-fp8 KVQ_SERVE_ARGS="--grid 64:inf --reserve 25
#               --out benchmarks/results/serve-load-pair1.json" (~420 s on a new machine, ~310 s warm), then the order
#               swapped (vllm-fp8,kvquant-fp8, pair2); the merge's summary.medians compares the medians
#   throughput  benchmarks/serving/throughput.py --compile --repeats 3, one workload (KVQ_WORKLOAD 1024x512,
#               256 requests, or 7424x512, 48), one part per call (KVQ_THR_PART, default a; on N GPUs the
#               first N parts, one per GPU: parts never share a GPU); each part <= 3 engines (~1 min start
#               + warm-up + 3 runs each) in one <= 10 min call; kvquant and vLLM's fp8 of one CUDA-graph
#               mode share a part, so their ratio is measured on one card in one call:
#                 1024x512  a: vllm-fp8-flash kvquant-fp8 kvquant-int8 (vLLM's default compilation)
#                           b: vllm-fp8-flash-full kvquant-fp8-full kvquant-int8-full (cudagraph_mode FULL)
#                           c: vllm-bf16 kvquant-fp8-fa3 vllm-int8-per-token-head
#                           d: kvquant-fp8 kvquant-fp8 vllm-fp8-flash (two engine starts of one config)
#                 7424x512  a: vllm-fp8-flash kvquant-fp8   b: vllm-fp8-flash kvquant-int8
#                           c: vllm-bf16 vllm-int8-per-token-head (two engines a call: ~35 s a run)
#               KVQ_THR_ARGS extra flags (e.g. the serving steady state: KVQ_WORKLOAD=1024x256 KVQ_REQUESTS=512
#               KVQ_THR_ARGS="--max-num-seqs 64 --max-num-batched-tokens 8192");
#               writes benchmarks/results/throughput-part-P-WL.json; merge the parts anywhere:
#               python3 -m benchmarks.serving.merge_throughput benchmarks/results/throughput-part-?-1024x512.json
#   profile     benchmarks/serving/profile_step.py --compile: kvquant-fp8 and vllm-fp8-flash, 160 engine
#               steps of the 1024x512 workload each under torch.profiler (KVQ_PROFILE_ARGS extra flags);
#               writes benchmarks/results/profile-<device>.json (per step kind: time by kernel category, and
#               `idle`: where the GPU waits, by neighbouring kernels, launching host op and host syncs; add
#               KVQ_PROFILE_ARGS=--with-stack for Python frames); KVQ_PROFILE_BUDGET seconds (default 540);
#               KVQ_PROFILE_WORKLOAD=serve64: serving's steady state at 64 requests instead (see below)
#   (throughput and profile engines get 28 GiB of GPU memory, the fraction computed per card; KVQ_GPU_MEM)
#   ncu         kernel-only (no bundle): Nsight Compute on one launch of our decode split kernel per
#               format (KVQ_LAB_SHAPES, default 64x16384; KVQ_NCU_CONFIG overrides; KVQ_LAB_LAYOUT one cache
#               layout of decode_lab's LAYOUTS, default backend), full section set;
#               logs/ncu-decode-<dtype>.ncu-rep, -details.log and -raw.csv come back in results.tgz
#   decode-lab  kernel-only (no bundle): benchmarks/kernels/decode_lab.py over KVQ_LAB_CONFIGS (space-separated
#               DecodeKernelConfig overrides, quoted; '' = default) and KVQ_LAB_LAYOUTS (cache layouts, default
#               backend; e.g. "backend v-channel-major") and KVQ_LAB_SCALES (scale granularities, default
#               per_tensor; e.g. "per_head per_channel"), writes benchmarks/results/decode-lab.json
#   tp          benchmarks/tp/check.py (needs 2 GPUs)
# Every lane's log and every results JSON come back in $OUT/results.tgz (the device returns at most 8 files);
# $OUT/summary.txt lists each lane's exit code and duration.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: scripts/gpu-run.sh check|bench|accuracy|serve-load|throughput|profile|ncu|decode-lab|tp}
OUT=${OUT:-/tmp/kvquant-gpu-out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export VLLM_WORKER_MULTIPROC_METHOD=spawn NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
# KVQ_NGPU / KVQ_DRY_RUN=1 (print each lane's GPU and command, run nothing): tests/test_gpu_run_script.py.
NGPU=${KVQ_NGPU:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
[ "$NGPU" -ge 1 ] || { echo "no GPU visible" >&2; exit 2; }
t0=$(date +%s)
nlanes=0

# lane NAME SECONDS CMD...: run CMD in the background on the next GPU (round robin), killed after SECONDS.
lane() {
  local name=$1 limit=$2 gpu=$((nlanes % NGPU))
  shift 2
  nlanes=$((nlanes + 1))
  if [ "${KVQ_DRY_RUN:-0}" = 1 ]; then
    echo "lane $name gpu=$gpu limit=$limit: $*"
    return
  fi
  (
    summary=$OUT/summary.txt
    # Results stay in benchmarks/results (tarred below): no per-file copies into $OUT (8 files come back).
    unset OUT
    export CUDA_VISIBLE_DEVICES=$gpu
    s=$(date +%s)
    timeout -k 10 "$limit" bash -c "$*" >"$LOGS/$name.log" 2>&1
    echo "lane $name (gpu $gpu): rc=$? in $(($(date +%s) - s)) s" >>"$summary"
  ) &
}

# Two kernel lanes: most of their time is Triton / FlashInfer compiling on the host (16 cores).
KERNEL_TESTS_A="tests/test_quantize_cache.py tests/test_decode_attention.py tests/test_prefill_attention.py"
KERNEL_TESTS_B="tests/test_prefill_runner.py tests/test_prefill_workspace.py"
KERNEL_TESTS_C="tests/test_decode_kernels_gpu.py tests/test_full_graphs.py tests/test_online_scales.py tests/test_scales_calibration.py"
ENGINE_TESTS="tests/test_backend_gpu.py"
SERVE_TESTS="tests/test_serve.py tests/test_serve_bad_input.py"
TMP_ROOT=/tmp/kvq-pytest
mkdir -p "$TMP_ROOT"
# -v: one line per finished test, so a lane cut off by its time limit still shows how far it got.
# faulthandler_timeout: a test (fixtures included) still running after 200 s dumps every thread's stack.
PYTEST="python3 -P -m pytest -v -p no:cacheprovider -rs --durations=30 -o faulthandler_timeout=200"
# pytest_lane NAME SECONDS ENV ARGS...: pytest under ENV (assignments, or "") in its own temp dir,
# a JUnit XML per lane.
pytest_lane() {
  local name=$1 limit=$2 env=$3
  shift 3
  lane "$name" "$limit" "$env $PYTEST --basetemp=$TMP_ROOT/$name --junitxml=$LOGS/$name.xml $*"
}
# Three engines serve a mixed workload without Triton JIT: a lane of its own (its chain of
# calibrate then engine starts would add minutes to the serve lane's).
JIT_TESTS="tests/test_jit_warmup_gpu.py"

# GPU memory for throughput / profile engines: 28 GiB (0.2 of an H200; 0.2 of an H100 does not hold
# Llama-3-8B's weights, so the same fraction cannot serve both cards). KVQ_GPU_MEM overrides.
gpu_mem() {
  if [ -n "${KVQ_GPU_MEM:-}" ]; then echo "$KVQ_GPU_MEM"; return; fi
  if [ "${KVQ_DRY_RUN:-0}" = 1 ]; then echo 0.2; return; fi
  python3 -c "import torch; print(round(28 * 2**30 / torch.cuda.get_device_properties(0).total_memory, 3))"
}

# The measured card's name in result file names (e.g. nvidia-h200); KVQ_DEVICE_SLUG overrides.
device_slug() {
  if [ -n "${KVQ_DEVICE_SLUG:-}" ]; then echo "$KVQ_DEVICE_SLUG"; return; fi
  python3 -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))"
}

case $stage in
check)
  # The engine lanes start first: they hold the longest chain (calibrate, then engines or a server).
  # KVQ_CHECK_LIMIT: seconds per lane (default 560; less when setup.sh runs in the same call).
  lim=${KVQ_CHECK_LIMIT:-560}
  pytest_lane engines $lim KVQUANT_FAIL_ON_SKIP=1 "$ENGINE_TESTS"
  pytest_lane serve $lim KVQUANT_FAIL_ON_SKIP=1 "$SERVE_TESTS"
  pytest_lane jit $lim KVQUANT_FAIL_ON_SKIP=1 "$JIT_TESTS"
  pytest_lane kernels-a $lim "" "-m gpu $KERNEL_TESTS_A ${KVQ_EXTRA_TESTS:-}"
  pytest_lane kernels-b $lim "" "-m gpu $KERNEL_TESTS_B"
  pytest_lane kernels-c $lim "" "-m gpu $KERNEL_TESTS_C"
  ;;
bench)
  lane bench 560 "python3 -m benchmarks.kernels.host_overhead; python3 -m benchmarks.kernels.prefill; \
    if [ \"${KVQ_DECODE:-0}\" = 1 ]; then python3 -m benchmarks.kernels.decode ${KVQ_DECODE_ARGS:-}; fi"
  ;;
accuracy)
  lane accuracy 570 "python3 -m benchmarks.accuracy.run ${KVQ_ACCURACY_ARGS:-}"
  ;;
serve-load)
  configs=${KVQ_SERVE_CONFIGS:-kvquant-fp8}
  slug=$(device_slug)
  case ${KVQ_SERVE_PHASE:-load} in
  load) phase_args=--no-trained-check suffix= ;;
  trained) phase_args=--trained-only suffix=-trained ;;
  all) phase_args= suffix= ;;
  *) echo "KVQ_SERVE_PHASE must be load, trained or all, got '$KVQ_SERVE_PHASE'" >&2; exit 2 ;;
  esac
  lane "serve-load-${configs//,/+}$suffix" 575 "python3 -m benchmarks.serving.serve_load --configs $configs $phase_args \
      --workdir $TMP_ROOT/serve-load --time-budget ${KVQ_SERVE_BUDGET:-540} \
      --out benchmarks/results/serve-load-$slug-${configs//,/+}$suffix.json ${KVQ_SERVE_ARGS:-}"
  ;;
throughput)
  wl=${KVQ_WORKLOAD:-1024x512}
  case $wl in 1024x512) n=256 parts="a b c d" ;; 7424x512) n=48 parts="a b c" ;; *) n=${KVQ_REQUESTS:?KVQ_REQUESTS for $wl} parts="a" ;; esac
  n=${KVQ_REQUESTS:-$n}
  thr_configs() {  # thr_configs PART: the part's configs (see the header)
    case $wl:$1 in
    1024x512:a) echo vllm-fp8-flash,kvquant-fp8,kvquant-int8 ;;
    1024x512:b) echo vllm-fp8-flash-full,kvquant-fp8-full,kvquant-int8-full ;;
    1024x512:c) echo vllm-bf16,kvquant-fp8-fa3,vllm-int8-per-token-head ;;
    1024x512:d) echo kvquant-fp8,kvquant-fp8,vllm-fp8-flash ;;
    # ~35 s a run (prefill-heavy, the KV cache holds ~half the requests): two engines a call.
    7424x512:a) echo vllm-fp8-flash,kvquant-fp8 ;;
    7424x512:b) echo vllm-fp8-flash,kvquant-int8 ;;
    7424x512:c) echo vllm-bf16,vllm-int8-per-token-head ;;
    *:a) echo vllm-fp8-flash,kvquant-fp8,kvquant-int8 ;;  # another workload (KVQ_REQUESTS): one part
    esac
  }
  want=${KVQ_THR_PART:-$(echo $parts | cut -d' ' -f1-"$NGPU")}
  [ "$(echo ${want//,/ } | wc -w)" -le "$NGPU" ] || { echo "throughput parts '$want' need one GPU each, $NGPU visible" >&2; exit 2; }
  common="--compile --repeats ${KVQ_REPEATS:-3} --input-len ${wl%x*} --output-len ${wl#*x} --num-requests $n \
    --gpu-memory-utilization $(gpu_mem) --time-budget 540 --child-timeout 300 ${KVQ_THR_ARGS:-}"
  for part in ${want//,/ }; do
    configs=$(thr_configs "$part")
    [ -n "$configs" ] || { echo "no throughput part $part for $wl (parts: $parts)" >&2; exit 2; }
    lane "thr-$wl-$part" 570 "python3 -m benchmarks.serving.throughput $common --configs $configs \
      --out benchmarks/results/throughput-part-$part-$wl.json"
  done
  ;;
profile)
  # KVQ_PROFILE_BUDGET: seconds for both engines (default 540; less when setup.sh runs in the same call);
  # one engine child may take 11/18 of it (330 s of 540), so a hung first engine leaves the second time.
  # KVQ_PROFILE_WORKLOAD: throughput (default: the 1024x512 workload, 256 requests at once) or
  # serve64, the steady state of `vllm serve` at max concurrency 64 (serve-load's first grid point):
  # 64 running, each finished request replaced by a new 1024-token prompt, vLLM serve's token budget
  # of 8192, steps recorded after the start-up ramp; writes profile-<device>-serve64.json.
  budget=${KVQ_PROFILE_BUDGET:-540}
  case ${KVQ_PROFILE_WORKLOAD:-throughput} in
  throughput) workload_args= ;;
  serve64)
    slug=$(device_slug)
    workload_args="--max-num-seqs 64 --max-num-batched-tokens 8192 --num-requests 512 --input-len 1024 \
      --output-len 256 --delay-iterations 400 --out benchmarks/results/profile-$slug-serve64.json" ;;
  *) echo "KVQ_PROFILE_WORKLOAD must be throughput or serve64, got '$KVQ_PROFILE_WORKLOAD'" >&2; exit 2 ;;
  esac
  lane profile $((budget + 30)) "python3 -m benchmarks.serving.profile_step --compile --gpu-memory-utilization $(gpu_mem) \
    --time-budget $budget --child-timeout $((budget * 11 / 18)) $workload_args ${KVQ_PROFILE_ARGS:-}"
  ;;
ncu|decode-lab)
  # Kernel-only, no bundle (the image has torch, Triton and ncu): the source tree laid out as the
  # installed package (kernels/ and scales/ inside vllm_kvquant/) on PYTHONPATH, unless installed.
  if [ "${KVQ_DRY_RUN:-0}" != 1 ] && ! python3 -P -c "import vllm_kvquant.kernels" 2>/dev/null; then
    src=/tmp/kvq-src/vllm_kvquant
    rm -rf /tmp/kvq-src && mkdir -p "$src" && cp -r vllm_kvquant/. "$src/" && cp -r kernels "$src/kernels" && cp -r scales "$src/scales"
    export PYTHONPATH=/tmp/kvq-src${PYTHONPATH:+:$PYTHONPATH}
  fi
  shapes=${KVQ_LAB_SHAPES:-64x16384}
  if [ "$stage" = ncu ]; then
    # One launch of our split kernel per format (default config, or KVQ_NCU_CONFIG), full section set:
    # memory throughput, warp stall reasons, occupancy, load widths; report + details page + raw CSV.
    lane ncu 570 "for dt in ${KVQ_LAB_DTYPES:-fp8_e4m3 int8}; do \
      ncu --target-processes all -k regex:_decode_split_kernel -c 1 --set full --import-source yes -f \
        -o $LOGS/ncu-decode-\$dt python3 -m benchmarks.kernels.decode_lab --ncu-config '${KVQ_NCU_CONFIG:-}' \
        --shapes $shapes --kv-dtypes \$dt --layouts ${KVQ_LAB_LAYOUT:-backend} && \
      ncu --import $LOGS/ncu-decode-\$dt.ncu-rep --page details > $LOGS/ncu-decode-\$dt-details.log && \
      ncu --import $LOGS/ncu-decode-\$dt.ncu-rep --page raw --csv > $LOGS/ncu-decode-\$dt-raw.csv; done"
  else
    # Our kernel under KVQ_LAB_CONFIGS (space-separated DecodeKernelConfig overrides, '' = default),
    # checked against the reference and timed as CUDA graphs beside a copy in the same run.
    lane decode-lab 570 "python3 -m benchmarks.kernels.decode_lab --shapes ${KVQ_LAB_SHAPES:-1x32768 8x32768 64x1024 64x4096 64x16384 128x8192 256x1024} \
      --configs ${KVQ_LAB_CONFIGS:-''} --layouts ${KVQ_LAB_LAYOUTS:-backend} --scales ${KVQ_LAB_SCALES:-per_tensor} \
      --out benchmarks/results/decode-lab.json"
  fi
  ;;
tp)
  [ "$NGPU" -ge 2 ] || { echo "tp needs 2 GPUs, $NGPU visible" >&2; exit 2; }
  nlanes=0
  (
    summary=$OUT/summary.txt
    unset OUT
    export CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((NGPU - 1)))
    s=$(date +%s)
    timeout -k 10 560 python3 -m benchmarks.tp.check ${KVQ_TP_ARGS:-} >"$LOGS/tp.log" 2>&1
    echo "lane tp (gpus $CUDA_VISIBLE_DEVICES): rc=$? in $(($(date +%s) - s)) s" >>"$summary"
  ) &
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
wait
[ "${KVQ_DRY_RUN:-0}" = 1 ] && exit 0
echo "stage $stage: $(($(date +%s) - t0)) s on $NGPU GPU(s)" >>"$OUT/summary.txt"
# Engine and server logs from the pytest temp dirs (small text files; model weights stay behind).
if [ -d "$TMP_ROOT" ]; then
  (cd "$TMP_ROOT" && find . -name '*.log' -size -4M -exec cp --parents {} "$LOGS/" \; ) 2>/dev/null
fi
tar -czf "$OUT/results.tgz" benchmarks/results "$LOGS" 2>/dev/null
cat "$OUT/summary.txt"
for f in "$LOGS"/*.log; do echo "=== $f"; tail -n 25 "$f"; done
