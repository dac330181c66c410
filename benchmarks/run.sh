#!/usr/bin/env bash
# make bench: builds the release benchmark binary, makes the random-weight benchmark models
# (diffusers in .venv), runs every benchmark and keeps the results as
# benchmarks/results/DATE-HOST.jsonl (one JSON line per measurement, the machine first) and
# DATE-HOST.md (a readable table).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${BENCH_MODELS:-target/bench-models}
THREADS=${BENCH_THREADS:-$(nproc)}
QUICK=${BENCH_QUICK:-}

cargo build --release --bin sdmesh-bench
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -r tests/fixtures/requirements.txt
fi
.venv/bin/python benchmarks/make_models.py "$MODELS"

mkdir -p benchmarks/results
stamp="$(date -u +%Y%m%d-%H%M)-$(hostname -s)"
out="benchmarks/results/$stamp.jsonl"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
mem=$(free -g | awk '/^Mem:/ {print $2}')
printf '{"machine": {"cpu": "%s", "cores": %s, "threads_used": %s, "memory_gib": %s, "kernel": "%s", "rustc": "%s"}}\n' \
  "$cpu" "$(nproc)" "$THREADS" "$mem" "$(uname -r)" "$(rustc --version)" > "$out"

bench=target/release/sdmesh-bench
export RAYON_NUM_THREADS=$THREADS
tiny=tests/fixtures/models/sd21-base-tiny
medium=$MODELS/sd21-medium
full=$MODELS/sd21-full-arch
steps=10; [ -n "$QUICK" ] && steps=4

# 1. mesh vs in-process
$bench overhead --model $tiny --size 64 --steps 20 --jobs 20 >> "$out"
$bench overhead --model $medium --size 256 --steps $steps --jobs 3 >> "$out"
# 2. throughput, batching on and off (128 px keeps 16 concurrent jobs within minutes on a CPU)
$bench throughput --model $medium --size 128 --steps 5 --concurrency 1,2,4,8,16 >> "$out"
# 3. candle vs diffusers, same machine, same threads, same configs. Two rounds, alternating, and
# the table takes each side's best: this VM's speed drifts (up to 2x for minutes), and one
# round each can put the two sides in different weather.
for model in $medium $full; do
  for round in 1 2; do
    profile=; [ $round = 1 ] && profile=--profile
    $bench components --model $model --size 256 --batch 2 --reps 3 $profile >> "$out"
    .venv/bin/python benchmarks/diffusers_components.py $model --height 256 --width 256 --batch 2 --reps 3 \
      --threads "$THREADS" >> "$out"
  done
done

.venv/bin/python benchmarks/table.py "$out" > "benchmarks/results/$stamp.md"
cat "benchmarks/results/$stamp.md"
