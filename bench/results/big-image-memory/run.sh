#!/usr/bin/env bash
# Peak memory of dfosd-trt-run's image path on a 3000x3000 input (BENCHMARKS.md, "Big images").
# after: this code; before: the same measurement on a checkout of commit 548e027 (before banding).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m dfosd.bench.big_image_memory --size 3000 --json "$here/after-3000.json"
# with PYTHONPATH pointing at a checkout of 548e027:  python3 "$here/before.py" 3000 > "$here/before-3000.json"
