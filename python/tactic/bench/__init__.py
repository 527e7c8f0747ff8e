"""Decode-speed benchmarks: `python -m tactic bench` (sweep) and `python -m tactic bench e2e`.

Modules: workloads (KV caches and queries), timing (CUDA events / wall clock, L2 rotation,
CUDA graphs), bandwidth (device copy bandwidth), traffic (bytes each method must read),
peers (the methods timed side by side), sweep (the sweep driver), report (table and JSON),
plot (the PNG), e2e (a Llama-3.1-8B-shaped decode loop).
"""
