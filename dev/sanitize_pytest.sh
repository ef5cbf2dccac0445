#!/usr/bin/env bash
# compute-sanitizer on pytest node ids (a gpu_session.sh step:
#   "sh:dev/sanitize_pytest.sh memcheck test_cuda.py::test_x"), run from tests/python with -m cuda.
# Exit 3 when the tool reports an error; the summary line is the log's last.
set -uo pipefail
tool=$1; shift
cd "$(dirname "$0")/../tests/python"
compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider -m cuda "$@"
