#!/usr/bin/env python3
"""Per-phase time of the CUDA certified stop rule's per-head kernel (cuda/select_certify.cuh).

A build with -DTACTIC_CERTIFY_PHASES makes certify_kernel stamp each phase with clock64() and
print one line per query head (`CERTPH ...`) for one launch in 25. This reads such output
(e.g. bench/profile_step.py's, which runs 25 steps per context) and prints, per cluster count
C, the median and the largest over the heads of every phase in thousands of SM cycles (about
0.5 us each on an H200), and of the counts the line carries. `bash bench/run_gpu.sh phases`
builds, runs and summarises.

    python bench/certify_phases.py profile-output.txt
"""
import collections
import re
import statistics
import sys

PHASES = ["A", "L", "chain", "fallback", "scan", "mass", "bound", "rounds", "final"]
COUNTS = ["full", "nl", "ncert", "nleft"]


def main(path):
    rows = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            if line.startswith("CERTPH"):
                d = dict(re.findall(r"(\w+)=([-\d.]+)", line))
                rows[int(d["C"])].append(d)
    if not rows:
        sys.exit(f"{path}: no CERTPH lines (a build without -DTACTIC_CERTIFY_PHASES?)")
    for c, rs in sorted(rows.items()):
        print(f"C={c} heads={len(rs)} (kcycles; counts)")
        for k in PHASES + COUNTS:
            v = [float(r[k]) for r in rs]
            print(f"  {k:8s} median {statistics.median(v):7.1f}  max {max(v):7.1f}")


if __name__ == "__main__":
    main(sys.argv[1])
