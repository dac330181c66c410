#!/usr/bin/env bash
# The GPU benchmark, run on the GPU machine (device tool) from the repo root, after
# benchmarks/gpu/prepare.sh here:
#   run(command="GPU_DEADLINE=570 benchmarks/gpu/run.sh", carry=["benchmarks/gpu/carry"], timeout_s=600)
# Stages (GPU_STAGES, default all, in this order: what issue 6 needs most first; each appends
# JSON lines to $OUT/gpu.jsonl and its log to $OUT/gpu.log, and a failing stage does not stop
# the next):
#   agreement  f16 and bf16 against the f32 CPU reference: components of the SD 2.1-768
#              architecture at 768x768 (NaN check with upcast_attention), a whole 10-step job
#              on the medium model; flash attention, the GroupNorm or GEGLU kernel or cuDNN's
#              convolutions, if its check fails in the timed dtype (or never reports), is off
#              for the later stages
#   components candle vs diffusers, UNet step / text encoder / VAE decode, 512 and 768, f16;
#              at 768 also with candle's convolutions (SDMESH_CUDNN_CONV=0), and with candle's
#              convolutions, attention, GroupNorm and GEGLU (also SDMESH_FLASH_ATTENTION=0
#              SDMESH_CUDA_GROUP_NORM=0 SDMESH_CUDA_GEGLU=0), to show what this project's kernels
#              buy; and where the UNet step's and the VAE decode's time goes (spans, waiting for
#              the GPU at each)
#   job        a whole 768x768 50-step DDIM job: through the mesh and in process, and diffusers
#   batch8     a UNet step at 768x768, batch 8 (the size that crashed candle's attention), and
#              batch 32 (one request of 16 guided images, the largest pass the service runs)
#   throughput images/s at 1 and 8 concurrent jobs, batching on and off (medium model, 512 px)
#   invariance a UNet step alone and in one pass with other jobs' steps (9 rows, 768x768):
#              whether step-level batching keeps each job's bits on the GPU (issue 5's promise)
# GPU_DEADLINE (seconds from the start, unset: none) bounds the whole run: each stage's limit is
# cut to what is left of it, and a stage with under 20 s left is skipped, so the run ends, with
# its table printed, inside the device call's timeout_s.
# A dry run of the script's plumbing on a CPU, tiny models, in minutes (make test runs it, with
# GPU_DIFFUSERS=0 to skip the diffusers stages: services/sdmesh/tests/gpu_script_dry_run.rs):
#   GPU_DEVICE=cpu GPU_BENCH=target/release/sdmesh-bench PYTHON=.venv/bin/python GPU_SIZES=64 \
#     GPU_BIG=tests/fixtures/models/sd21-tiny GPU_MEDIUM=tests/fixtures/models/sd21-base-tiny \
#     benchmarks/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
device=${GPU_DEVICE:-cuda}
python=${PYTHON:-python3}
sizes=${GPU_SIZES:-512 768}
big_size=${sizes##* }
OUT=${OUT:-/tmp/sdmesh-gpu-out}
mkdir -p "$OUT"
log="$OUT/gpu.log"; results="$OUT/gpu.jsonl"
stages=${GPU_STAGES:-agreement components job batch8 throughput invariance}
models=/tmp/sdmesh-models
carry=benchmarks/gpu/carry
dtype=${GPU_DTYPE:-f16}
exec > >(tee -a "$log") 2>&1

# diffusers, installed by prepare.sh and packed as a tar.xz (a third of the wheel's size).
if [ -f "$carry/site.tar.xz" ]; then
  site=$(mktemp -d) && trap 'rm -rf "$site"' EXIT && xz -dc "$carry/site.tar.xz" | tar -x -C "$site" && export PYTHONPATH=$site || exit 1
fi
# The CUDA 13 runtime libraries candle links (cublas, curand, nvrtc) from the image's wheels, and
# cuDNN 9 (nvidia-cudnn-cu13), which sdmesh opens at run time for its convolutions.
cu13=$("$python" -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)
cudnn=$("$python" -c 'import os, nvidia.cudnn as c; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH="$cu13:${cudnn:+$cudnn:}/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
bench=${GPU_BENCH:-/tmp/sdmesh-bench}
if [ -z "${GPU_BENCH:-}" ]; then xz -dc "$carry/sdmesh-bench.xz" > "$bench" && chmod +x "$bench" || exit 1; fi
# The driver's libcuda.so.1 wherever the image keeps it; stop early, saying what is missing.
for d in $(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 -maxdepth 2 -name 'libcuda.so.1' -printf '%h\n' 2>/dev/null | sort -u); do
  export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
done
if ! "$bench" --help > /dev/null 2>&1; then
  echo "sdmesh-bench does not start:"; "$bench" --help 2>&1 | head -3; ldd "$bench" | grep "not found"; exit 1
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
printf '{"machine": {"gpu": "%s", "cpu": "%s", "cores": %s, "torch": "%s", "started": "%s"}}\n' "$gpu" \
  "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" "$(nproc)" \
  "$("$python" -c 'import torch; print(torch.__version__)')" "$(date -u +%FT%TZ)" >> "$results"
if [ -z "${GPU_BIG:-}" ]; then "$python" benchmarks/make_models.py "$models" sd21-768-arch sd21-medium || exit 1; fi
big=${GPU_BIG:-$models/sd21-768-arch} medium=${GPU_MEDIUM:-$models/sd21-medium}

stage() {  # stage NAME SECONDS COMMAND...: runs one measurement, JSON lines to $results
  local name=$1 limit=$2; shift 2
  case $name in *diffusers*) if [ "${GPU_DIFFUSERS:-1}" = 0 ]; then echo "== $name: skipped (GPU_DIFFUSERS=0)"; return; fi ;; esac
  if [ -n "${GPU_DEADLINE:-}" ]; then
    local left=$((GPU_DEADLINE - SECONDS - 10))
    if [ "$left" -lt 20 ]; then echo "== $name: skipped (deadline, ${left} s left)"; return; fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
  fi
  echo "== $name: $*"
  local started=$SECONDS
  timeout "$limit" "$@" >> "$results"
  local rc=$?
  echo "== $name: rc $rc after $((SECONDS - started)) s"
}
diffusers="$python benchmarks/diffusers_components.py"
# This project's GPU paths: the prefix of their agreement checks, and the variable that turns each off.
kernels="attn:SDMESH_FLASH_ATTENTION groupnorm:SDMESH_CUDA_GROUP_NORM conv:SDMESH_CUDNN_CONV geglu:SDMESH_CUDA_GEGLU"
tdtype=$(case $dtype in bf16) echo bfloat16 ;; f32) echo float32 ;; *) echo float16 ;; esac)
dtypes=${GPU_AGREEMENT_DTYPES:-f16,bf16}

for s in $stages; do case $s in
  agreement)
    stage agreement-$big_size 240 $bench agreement --model $big --size $big_size --steps 0 --device $device --dtypes $dtypes
    stage agreement-job 120 $bench agreement --model $medium --size 256 --steps 10 --device $device --dtypes $dtypes
    # A kernel of this project's whose check failed in the timed dtype, or never reported (a
    # crash), is switched off for the stages that follow: one run still times the rest, and
    # the JSON lines record which kernels ran (flash_attention, cuda_group_norm, cudnn_conv,
    # cuda_geglu).
    for kernel in $kernels; do
      prefix=${kernel%%:*} var=${kernel#*:}
      verdict=$("$python" - "$results" "$prefix" "$dtype" <<'PY'
import json, sys
path, prefix, dtype = sys.argv[1:]
lines = [json.loads(l) for l in open(path) if l.startswith("{")]
checks = [l for l in lines if l.get("bench") == "agreement" and l.get("component", "").startswith(prefix + "_")
          and l.get("dtype") == dtype]
print("ok" if checks and all(l.get("ok") for l in checks) else "off")
PY
)
      if [ "$verdict" != ok ]; then echo "== agreement: ${prefix}_* failed or did not report in $dtype: $var=0 from here on"; export "$var=0"; fi
    done ;;
  invariance)
    stage invariance 120 $bench invariance --model $big --size $big_size --device $device --dtype $dtype ;;
  components)
    for size in $sizes; do
      stage components-$size 120 $bench components --model $big --size $size --batch 2 --reps 10 --device $device --dtype $dtype
      stage diffusers-$size 120 $diffusers $big --height $size --width $size --batch 2 --reps 10 --device $device --dtype $tdtype
    done
    SDMESH_CUDNN_CONV=0 stage components-$big_size-candle-conv 120 $bench components \
      --model $big --size $big_size --batch 2 --reps 5 --device $device --dtype $dtype
    (for kernel in $kernels; do export "${kernel#*:}=0"; done
     stage components-$big_size-candle-ops 120 $bench components --model $big --size $big_size --batch 2 --reps 5 \
       --device $device --dtype $dtype)
    stage profile-$big_size 120 $bench components --model $big --size $big_size --batch 2 --reps 1 --profile \
      --device $device --dtype $dtype ;;
  job)
    stage job-mesh 240 $bench overhead --model $big --size $big_size --steps 50 --jobs 2 --device $device --dtype $dtype
    stage job-diffusers 120 $diffusers $big --height $big_size --width $big_size --reps 3 --device $device --dtype $tdtype \
      --skip-components --job-steps 50 ;;
  batch8)
    stage batch8 120 $bench components --model $big --size $big_size --batch 8 --reps 3 --device $device --dtype $dtype
    stage diffusers-batch8 120 $diffusers $big --height $big_size --width $big_size --batch 8 --reps 3 --device $device --dtype $tdtype
    # The largest forward pass the unet service runs: one request of 16 images under guidance.
    stage batch32 120 $bench components --model $big --size $big_size --batch 16 --guided --reps 1 --device $device --dtype $dtype ;;
  throughput)
    stage throughput 240 $bench throughput --model $medium --size ${sizes%% *} --steps 20 --concurrency 1,8 --device $device --dtype $dtype ;;
  *) echo "unknown stage $s" ;;
esac; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
"$python" benchmarks/table.py "$results" > "$OUT/table.md" && cat "$OUT/table.md"
echo "results: $results"
