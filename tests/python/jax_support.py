"""What the JAX test files share: jax and orchard.jax (importing this from a test module skips
that module when either is missing), the CPU device, random arrays committed to it, and the keys
each query sees under flash-attn's causal / window conventions."""

from __future__ import annotations

import os

import numpy as np
import pytest

# JAX would take 75% of the GPU's memory at its first use; the same pytest process
# also runs torch and CuPy tests on that GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

try:
    import orchard.jax as ojax  # noqa: E402
except ImportError as e:  # orchard built before jax was installed
    pytest.skip(f"orchard.jax unavailable: {e}", allow_module_level=True)

CPU = jax.devices("cpu")[0]


def cpu_normal(seed, *shapes, dtype=jnp.float32):
    """Standard normal arrays of these shapes, committed to the CPU: the tests that use them
    check the CPU handlers (on a GPU machine jax would otherwise run them, and the jnp
    references at XLA's default GPU matmul precision, TF32, on the GPU)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return tuple(jax.device_put(jax.random.normal(kk, s, dtype), CPU) for kk, s in zip(keys, shapes))


def visible(sq, sk, causal=False, window=(-1, -1)):
    """(sq, sk) bool NumPy mask of the keys each query sees: flash-attn's bottom-right aligned
    causal diagonal and (left, right) window (-1: unbounded)."""
    i = np.arange(sq)[:, None] + (sk - sq)
    j = np.arange(sk)[None, :]
    ok = np.ones((sq, sk), bool)
    if causal:
        ok &= j <= i
    if window[0] >= 0:
        ok &= j >= i - window[0]
    if window[1] >= 0:
        ok &= j <= i + window[1]
    return ok


__all__ = ["jax", "jnp", "ojax", "CPU", "cpu_normal", "visible"]
