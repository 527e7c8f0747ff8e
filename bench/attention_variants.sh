#!/usr/bin/env bash
# Build attention_check with compile-time variants of the chunk kernel and time each (dense
# 1 x 8 KV heads x G 4 x D 128 fp16) at the given contexts; for A/B decisions on the GPU.
#   bash bench/attention_variants.sh "NAME:-DFLAG=1 ..." ...   (env: NS="32768 131072 524288")
set -uo pipefail
cd "$(dirname "$0")/.."
NS=${NS:-"32768 131072 524288"}
i=0
for v in "$@"; do
  name=${v%%:*}; flags=${v#*:}
  nvcc -std=c++17 -O2 -arch=sm_90 -Icpp/include -Icpp/src -Icuda -Xcompiler -fopenmp $flags \
    tests/cuda/attention_check.cu cuda/attention.cu cpp/src/*.cpp -o /tmp/att_$name &
  i=$((i + 1))
done
wait
for v in "$@"; do
  name=${v%%:*}
  for n in $NS; do echo "[$name n=$n] $(/tmp/att_$name --time-only --time-n $n | grep TIME | tr '\n' ' ')"; done
done
