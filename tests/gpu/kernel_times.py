"""Sums Nsight Compute's per-kernel durations (a --csv log of gpu__time_duration.sum) by kernel
name, per decode step: python3 kernel_times.py NCU_CSV. A step starts with its one `embed_rows`
launch; only the whole steps between the first and the last one seen are counted."""

import collections
import csv
import sys

UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}

with open(sys.argv[1]) as f:
    rows = list(csv.DictReader(line for line in f if line.startswith('"')))
launches = sorted(
    (int(r["ID"]), r["Kernel Name"].split("(")[0][:60],
     float(r["Metric Value"].replace(",", "")) * UNITS[r["Metric Unit"]])
    for r in rows
    if r["Metric Name"] == "gpu__time_duration.sum"
)
starts = [i for i, (_, name, _) in enumerate(launches) if name == "embed_rows"]
if len(starts) < 2:
    sys.exit(f"{len(starts)} step starts (embed_rows) among {len(launches)} kernels: time more launches")
steps = len(starts) - 1
window = launches[starts[0]:starts[-1]]
total = collections.Counter()
count = collections.Counter()
for _, name, us in window:
    total[name] += us
    count[name] += 1
print(f"{len(window)} kernels in {steps} whole steps: GPU busy {sum(total.values()) / steps / 1e3:.3f} ms a step")
for name, us in total.most_common():
    print(f"{us / steps:9.1f} us a step  {count[name] / steps:6.1f} launches  {name}")
