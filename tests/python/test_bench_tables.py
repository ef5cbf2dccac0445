"""bench/gpu_bench.py's round bookkeeping, on made-up timings (no GPU): the paired ratios
(each round's peer time over Orchard's, then the median) and the table's list of points a
run does not resolve."""
import importlib.util
import os

import pytest


def _gpu_bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu_bench.py")
    spec = importlib.util.spec_from_file_location("_gpu_bench_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _round(fwd_ms, bwd_ms):
    return {"do_bench": (fwd_ms, bwd_ms), "events": (fwd_ms * 1.1, bwd_ms * 1.1)}


def test_paired_ratios_cancel_a_drift_between_rounds():
    gb = _gpu_bench()
    # The card slows down 2x in round 2 for both: every round's ratio is the same, while the
    # ratio of the two medians would move with the rounds' mix.
    ours = [_round(1.0, 2.0), _round(2.0, 4.0), _round(1.0, 2.0)]
    peer = [_round(1.1, 1.8), _round(2.2, 3.6), _round(1.1, 1.8)]
    got = gb.paired_ratios(ours, peer)
    assert got["do_bench_fwd"]["median"] == pytest.approx(1.1)
    assert got["do_bench_fwd"]["range"] == pytest.approx([1.1, 1.1])
    assert got["do_bench_bwd"]["median"] == pytest.approx(0.9)
    assert got["events_fwd"]["median"] == pytest.approx(1.1)


def test_paired_ratios_use_only_the_rounds_both_have():
    gb = _gpu_bench()
    ours = [_round(1.0, 1.0), _round(1.0, 1.0), _round(1.0, 1.0)]
    peer = [_round(0.9, 1.2), _round(1.3, 1.2)]  # the peer failed in round 3
    got = gb.paired_ratios(ours, peer)
    assert got["do_bench_fwd"]["median"] == pytest.approx(1.1)
    assert got["do_bench_fwd"]["range"] == pytest.approx([0.9, 1.3])
    assert gb.paired_ratios([], peer) == {}


def test_table_names_the_unresolved_points_and_shows_paired_medians():
    gb = _gpu_bench()
    ours = [_round(1.0, 1.0), _round(1.0, 1.0), _round(1.0, 1.0)]
    peers = {"sdpa_cudnn": [_round(0.96, 1.2), _round(1.03, 1.25), _round(0.99, 1.3)]}
    cell = {"fwd_tflops": 500.0, "bwd_tflops": 400.0, "spread": 0.01,
            "paired": {p: gb.paired_ratios(ours, r) for p, r in peers.items()}}
    row = {"d": 128, "causal": True, "s": 2048, "b": 8, "h": 16, "orchard": cell,
           "sdpa_cudnn": {"fwd_tflops": 505.0, "bwd_tflops": 330.0, "spread": 0.02}}
    result = {"meta": {"card": "test card", "date": "2026-12-03", "commit": "abc", "torch": "x", "reps": 5,
                       "timer": "do_bench", "rounds": 3},
              "grid": [row], "latency_us_small": {}, "peak_mib_s32k": {}}
    assert gb.unresolved_points(result, "do_bench") == ["d128c s2048 fwd vs sdpa_cudnn 0.96-1.03"]
    table = gb.render_table(result, ["orchard", "sdpa_cudnn"])
    assert "| 128 | yes | 2048 | 8 | 500/400 | 505/330 | 0.99x/1.25x |" in table
    assert "d128c s2048 fwd vs sdpa_cudnn 0.96-1.03" in table
