"""The randomized suites' hypothesis settings: example counts scaled by ORCHARD_FUZZ_EXAMPLES
(default 1; e.g. 20 on a GPU box) and derandomized draws (reproducible CI) unless
ORCHARD_FUZZ_RANDOM=1 (a bug hunt; add pytest's --hypothesis-seed=N to replay a run)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_FACTOR = float(os.environ.get("ORCHARD_FUZZ_EXAMPLES", "1"))
FUZZ_DERANDOMIZE = os.environ.get("ORCHARD_FUZZ_RANDOM", "0") in ("", "0")


def n_examples(n: int) -> int:
    return max(1, int(round(n * FUZZ_FACTOR)))


def fuzz_settings(n: int):
    return settings(max_examples=n_examples(n), deadline=None, derandomize=FUZZ_DERANDOMIZE, database=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
