// A forward call with few query rows per kv head (a decode step, a speculative-decoding or
// cross-attention call with a handful of queries) run on a backend's decode (KV-cache) kernel:
// the keys of each batch entry are its "cache", read in place, never appended to. The
// decode kernels serve a kv head's whole query group at once and split the keys over
// CTAs / threads, where the tiled forwards stage K / V per (batch, kv head) and give each
// row its own pass. Each backend decides when this pays (few_rows_forward.h on the CPU,
// fp32_takes_decode_kernel in cuda_backend.cu on CUDA); this file says what the decode
// kernels can compute.
#pragma once

#include "orchard/decode_params.h"
#include "orchard/params.h"

namespace orchard::detail {

// True if the decode kernels compute p exactly as the forward would, with at most max_rows
// query rows per kv head (query heads per kv head x sq): a head dim that is a multiple of 8 up to
// 256 with d_v == d, no varlen, segments, bias / mask or dropout, and a bottom-right diagonal
// (sk - sq) wherever causal, a window or ALiBi needs one. The dtype is the caller's to check.
bool forward_fits_decode_kernel(const FwdParams& p, int max_rows);

// p as DecodeParams with num_splits key splits (the split partials not yet placed).
// Requires forward_fits_decode_kernel(p, ...).
DecodeParams forward_as_decode(const FwdParams& p, int num_splits);

}  // namespace orchard::detail
