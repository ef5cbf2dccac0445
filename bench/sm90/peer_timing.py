"""CUDA-event timing shared by the sm90 benches' peer scripts (attn_peers.py, bwd_peers.py)."""
import torch


def time_ms(fn, reps=20):
    """Median of `reps` CUDA-event times of fn() in ms, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]
