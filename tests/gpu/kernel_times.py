"""Sums Nsight Compute's per-kernel durations (a --csv log of gpu__time_duration.sum) by kernel
name, per decode step: python3 kernel_times.py NCU_CSV STEPS."""

import collections
import csv
import sys

path, steps = sys.argv[1], int(sys.argv[2])
with open(path) as f:
    lines = [line for line in f if line.startswith('"')]
rows = list(csv.DictReader(lines))
total = collections.Counter()
count = collections.Counter()
for r in rows:
    if r["Metric Name"] != "gpu__time_duration.sum":
        continue
    name = r["Kernel Name"].split("(")[0][:60]
    unit = r["Metric Unit"]
    value = float(r["Metric Value"].replace(",", ""))
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}[unit]
    total[name] += value * scale
    count[name] += 1
busy = sum(total.values())
print(f"{sum(count.values())} kernels timed over {steps} steps: GPU busy {busy / steps / 1e3:.3f} ms a step")
for name, us in total.most_common():
    print(f"{us / steps:9.1f} us a step  {count[name] / steps:6.1f} launches  {name}")
