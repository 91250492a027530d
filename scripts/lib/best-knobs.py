#!/usr/bin/env python3
"""The knob row of a device-pass.sh pass.md whose GPU ms, summed over the given token counts, is
lowest: prints its comma-separated VAR=value list ('' for the defaults' row), so one device call
can time the knobs and then serve with the fastest (scripts/device-all.sh callers).
Usage: best-knobs.py PASS_MD [TOKENS, default 16,32]"""
import re
import sys

want = (sys.argv[2] if len(sys.argv) > 2 else "16,32").split(",")
best, cur, tot = None, None, {}
for line in open(sys.argv[1]):
    m = re.match(r"## bench forward, after(?:, (\S*))? \(", line)
    if m:
        cur, tot = m.group(1) or "", {}
        continue
    m = re.match(r"\| (\d+) \| [\d.]+ \| ([\d.]+) \|", line)
    if m and cur is not None and m.group(1) in want:
        tot[m.group(1)] = float(m.group(2))
        if len(tot) == len(want):
            s = sum(tot.values())
            if best is None or s < best[0]:
                best = (s, cur)
print(best[1] if best else "")
