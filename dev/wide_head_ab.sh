#!/bin/bash
# A/B of the sm80 backward at head dims 160/192/256 (bench/wide_head_bwd.py): the default
# kernel choice (one-pass where shared memory allows) vs ORCHARD_BWD_TWO_PASS=1, each
# against FA2 in the same process. Run from the repository root with the package on PYTHONPATH.
set -uo pipefail
python3 bench/wide_head_bwd.py --label one-pass
ORCHARD_BWD_TWO_PASS=1 python3 bench/wide_head_bwd.py --label two-pass | tail -n +3
