"""torch.autocast for Orchard's ops: inside an autocast region the attention
inputs take the region's dtype, as torch's own scaled_dot_product_attention
does (a "lower precision fp" op in torch's autocast lists).

An Autocast kernel is registered for ``orchard::flash_attn_forward`` on the CPU,
CUDA (and MPS) autocast dispatch keys. It casts q, k and v that are float32,
float16 or bfloat16 tensors on the region's device type to
``torch.get_autocast_dtype(device_type)`` (float64 is left alone, as autocast
does), then runs the op with that autocast key excluded. Only q/k/v are cast:
the feature tensors keep the dtypes the kernels require (ALiBi slopes and sink
logits float32, a float attn_mask float32 or the query's dtype, int32
cu_seqlens). The casts are ordinary differentiable ``Tensor.to`` calls, so the
gradients of float32 leaves come back in float32. The backward op needs no
kernel: it runs on the tensors the forward saved, in the forward's dtype.

The entry points (``flash_attn_func``, ``scaled_dot_product_attention``, the
varlen/packed forms, Hugging Face's ``attn_implementation="orchard"``) all go
through this op, so all of them follow autocast.
"""

from __future__ import annotations

import torch

from . import _ops

__all__ = ["AUTOCAST_DEVICE_TYPES"]

_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)

_LIB = torch.library.Library("orchard", "IMPL")  # noqa: TOR901 (kept alive for the process)


def _make_kernel(device_type: str, key: "torch._C.DispatchKey"):
    exclude = torch._C.DispatchKeySet(key)

    def cast(t, dtype):
        if (isinstance(t, torch.Tensor) and t.dtype in _ELIGIBLE and t.dtype != dtype
                and t.device.type == device_type):
            return t.to(dtype)
        return t

    def kernel(q, k, v, *rest):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = cast(q, dtype), cast(k, dtype), cast(v, dtype)
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return _ops._FWD(q, k, v, *rest)

    kernel.__name__ = f"flash_attn_forward_autocast_{device_type}"
    return kernel


AUTOCAST_DEVICE_TYPES = []
for _device_type, _key_name in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA"),
                                ("mps", "AutocastMPS")):
    _key = getattr(torch._C.DispatchKey, _key_name, None)
    if _key is None:  # an older torch without this autocast key
        continue
    _LIB.impl("flash_attn_forward", _make_kernel(_device_type, _key), _key_name)
    AUTOCAST_DEVICE_TYPES.append(_device_type)
