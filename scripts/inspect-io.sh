#!/usr/bin/env bash
# Shows that `edgediff inspect` reads only the header of a model file: builds a ≥ 2 GB synthetic
# LLaDA2.0-mini-shaped q4 model (6 layers), runs inspect under strace and sums the bytes that read /
# pread return on the model's file descriptor, and lists any mmap of it.
# Usage: scripts/inspect-io.sh [workdir]   (needs strace; ~1 min and 2.6 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
cargo build --release -q -p edgediff
bin=$PWD/target/release/edgediff
model=$work/llada2-mini-6l-q4.edm
[ -f "$model" ] || "$bin" synth --arch llada2_moe --preset llada2-mini --layers 6 --dtype q4 -o "$model"
strace -f -e trace=openat,read,pread64,mmap -o "$work/trace.txt" "$bin" inspect "$model" >/dev/null
python3 - "$work/trace.txt" "$model" <<'PY'
import os, re, sys
trace, model = sys.argv[1], sys.argv[2]
name = re.escape(os.path.basename(model))
fd, total, maps = None, 0, []
for line in open(trace):
    m = re.search(r'openat\(.*%s".*= (\d+)' % name, line)
    if m:
        fd = m.group(1)
        continue
    if fd:
        m = re.search(r'(?:read|pread64)\(%s,.*= (\d+)' % fd, line)
        if m:
            total += int(m.group(1))
        if re.search(r'mmap\(.*, %s, ' % fd, line):
            maps.append(line.strip())
size = os.path.getsize(model)
print(f"model {size} bytes; inspect read {total} bytes of it ({100 * total / size:.6f} %); mmaps of it: {len(maps)}")
sys.exit(0 if total < 1 << 20 and not maps else 1)
PY
