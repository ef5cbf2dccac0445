// FlashAttention forward for sm_90a (H100/H200): warp-specialized, TMA + mbarrier + wgmma,
// written on our own PTX wrappers (sm90.cuh).  Compile ONLY with
// -gencode=arch=compute_90a,code=sm_90a.
//
// Persistent: grid = min(tiles, SMs), one CTA per SM (its registers fill the SM); each CTA runs
// the query tiles of a linear tile index in a fixed stride (fwd_sm90_schedule.h: L2-sized
// sections of (batch, head) pairs; causal, m blocks longest first, or pairs of a long and a
// short m block as the stride's unit; not causal, m block innermost).  Some causal calls launch
// one CTA per tile instead (the launcher says which and why).
// A tile = 64 * kWG query rows of one (batch, q head); kWG + 1 warpgroups:
//   WG0  producer: one elected thread issues TMA loads of Q (once per tile) and of the K / V
//        tiles into a 2-stage ring (separate K and V barriers, so S = QK^T starts before V
//        lands); setmaxnreg.dec.  It runs ahead into the next tile while the consumers finish
//        this one: the next tile's first K goes out as soon as its ring stage is free, each
//        consumer WG's part of its Q once that WG's warps have done their last QK^T of this
//        tile (q_empty(wg)), so the next tile's loads overlap this tile's last PV and epilogue.
//   WG1..WGkWG  consumers, 64 query rows each (setmaxnreg.inc):
//        S = Q K^T   wgmma ss (Q and K both K-major in smem, 128B swizzle; 64B at d96),
//        online softmax in registers (exp2, scale folded into log2 units),
//        P -> 16-bit in registers (the accumulator layout IS the wgmma A-fragment layout),
//        O += P V    wgmma rs (V MN-major in smem: transposed read, no transpose pass);
//        the epilogue writes LSE from registers and O either staged in shared memory and sent
//        by TMA stores (kOStaged: the tiles that leave room for an O buffer; kOInV: in the
//        last key tile's V stage, d128's 192-key tiles; kOShared, an A/B switch: one WG's
//        part of a buffer, the WGs in turn) or straight from registers (16-byte stores after a
//        quad transpose), then the next tile.
// kOverlap (FA3's intra-warpgroup overlap): the QK^T of tile j+1 and the PV of tile j are in
// flight together; softmax of tile j+1 runs while PV(j) executes on the tensor cores.  With
// kFwdSm90CrossTile (d256, d128's 128-key non-causal kernel) that also spans query tiles: the
// next query tile's first QK^T goes out with this one's last PV.
// GEMM token (kFwdSm90PingPong, FA3's warp-scheduler barrier; d64, d96 and d128): the consumer WGs
// issue their GEMMs in turn (named barriers 1..kWG as a ring), so one WG's softmax runs under
// the others' GEMMs instead of all WGs contending for the tensor cores at once.
// Barriers across tiles: the K / V ring's stage and phase come from a count of key tiles kept
// for the whole CTA (producer: loaded, consumers: consumed), not per tile; each WG's q_full /
// q_empty flip once per tile that loads Q.  Every consumer warp frees every K and V stage it used,
// the last key tile's V included (after the final PV).  A tile whose rows see no key (window,
// causal with sq > sk) loads nothing (no Q, no ring stage) and writes O = 0, LSE -inf; producer
// and consumers decode the tile index with the same function, so they agree on that.
// Supported: T = bf16 / fp16; kD (the head-dim bucket) = 64, 96, 128, 192, 256 and any run-time
// d == d_v with d <= kD, d % 8 == 0: the tensor maps have the true width d, so TMA fills the
// columns d..kD-1 of the Q / K / V tiles with zeros (QK^T and PV add nothing for them) and the
// epilogue stores d columns; scale > 0 (the running max is
// taken over the scores divided by the scale); causal (any causal_offset) or not;
// GQA (kv head = q head / (hq / hkv)); BSHD/BHSD views with unit last stride and 16-byte
// aligned rows (TMA: strides multiples of 16 bytes).
// Sliding window, softcap and ALiBi (params.h; flash-attn's semantics, the sm80 kernels'
// helpers in sm80/attention_tiles.cuh): run-time, CTA-uniform branches, no template
// parameter (H200, session 11: plain calls ran at 0.97-1.02x the forward without them, two
// rounds; the backward, which lost more, has a kFeatures flag).  The window narrows the key
// tiles to [n_begin, n_end) (tiles no row of the CTA sees are never loaded); a tile is then
// scored through apply_score_mods (softcap, ALiBi, the window / causal / key-end mask on tiles
// crossing a bound) instead of mask_tile.  Rows that see no key end with O = 0 and LSE -inf
// (as causal rows already did).  attn_bias: row-broadcast ones (a key-padding mask) in the kBias
// kernels (a template flag: with the bias reads compiled in as a run-time branch, every kernel of
// the bucket spilled, bf16 d128 0 -> 68-268 B of stores), through the feature path plus
// add_attn_bias_row (attn_bias_fragment.cuh); a boolean mask's hidden key tiles at either end
// are dropped from [n_begin, n_end) like the window's, and a tile it shows whole skips the
// per-element pass.  Attention sinks: a run-time branch of the
// epilogue (the sink joins each row's sum; the backward needs nothing more: its P comes from
// the LSE, which holds the sink).  Varlen in its segment form only (segments.cuh: q and k share one
// cu_seqlens tensor; the packed rows run as one sequence, tiles narrowed to their rows' segments,
// elements of other segments masked where a tile crosses a boundary).  Dropout: a run-time branch
// after each tile's softmax (dropout_scores.cuh) and 1 / (1 - p) in the epilogue's scale; no
// dropout mask output.  Other biases: the dispatch (cuda_backend.cu, sm90_fwd_applies) sends those
// to the sm80 kernels.
// Outputs: O (dtype T, rows past sq untouched) and LSE (fp32, natural log, at
// lse[b * lse_batch_stride + h * lse_head_stride + row], -inf for a row that sees no key).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "backends/cuda/device_attribute.h"
#include "backends/cuda/launch.h"
#include "backends/cuda/sm80/attention_tiles.cuh"
#include "backends/cuda/sm90/attn_bias_fragment.cuh"
#include "backends/cuda/sm90/attn_bias_tiles.cuh"
#include "backends/cuda/sm90/flash_fwd_sm90_launch.h"
#include "backends/cuda/sm90/dropout_scores.cuh"
#include "backends/cuda/sm90/fragment_store.cuh"
#include "backends/cuda/sm90/fwd_sm90_schedule.h"
#include "backends/cuda/sm90/segments.cuh"
#include "backends/cuda/sm90/sm90_call_support.h"
#include "backends/cuda/sm90/sm90.cuh"
#include "backends/cuda/sm90/tma_host.h"
#include "orchard/params.h"

namespace orchard::sm90 {

// Keys per tile: 128 (d192 / d256: 64, registers for O); kBNv overrides it (bench experiments).
template <int kD>
constexpr int default_block_n() { return kD <= 128 ? 128 : 64; }

// Whether a causal kernel strides over its tiles in the paired order (fwd_sm90_schedule.h), a
// compile-time property of each kernel (no run-time branch in the tile decode: the extra code
// cost up to 5 % through scheduling).  Measured on the H200 (session 15, alternating binaries,
// b * s = 16k tokens): paired against one CTA per tile +6..14 % at d192 / d256 s2k..s8k (-1..-3 %
// at s16k), against the plain persistent stride +7 % at d128 s1k..s2k, within +-3 % at d64;
// at d128 s8k / s16k (the 192-key kernel) it lost 1..4 % to one CTA per tile, so that kernel
// keeps the plain order.
template <bool kCausal, int kD, int kBNv>
inline constexpr bool kFwdSm90PairsCausalTiles = kCausal && !(kD >= 96 && kD <= 128 && kBNv == 192);

// Ping-pong of the consumer warpgroups (FA3's warp-scheduler barrier): each WG issues its GEMMs
// of a step only when it holds the token (named barrier 1 + wg) and passes it to the next WG
// (a ring) right after, so one WG's GEMMs run on the tensor cores while another does its
// softmax, instead of all WGs contending for them at once and then all doing softmax.  Used in
// the overlap kernels up to head-dim bucket ORCHARD_SM90_FWD_PINGPONG_MAX_D (0: off), and in the
// plain-order kernels with ORCHARD_SM90_FWD_PLAIN_PINGPONG (a token for the QK^T and for the PV).
// The H200 (session 23, ab_fwd.sh, medians of 3 alternating rounds, over no token): d128 +2.2-5.6 %
// non-causal (s2k 532 -> 557, s8k 624 -> 647 TFLOP/s), +3.8-4.5 % causal at s >= 2k, fp16 +5 %;
// d192 / d256 -1 to +3.5 % (noise: off there); the plain order -8 to -12 % at d64 (off).
#ifndef ORCHARD_SM90_FWD_PINGPONG_MAX_D
#define ORCHARD_SM90_FWD_PINGPONG_MAX_D 128
#endif
#ifndef ORCHARD_SM90_FWD_PLAIN_PINGPONG
#define ORCHARD_SM90_FWD_PLAIN_PINGPONG 0
#endif
// d64's 3-warpgroup kernel in the overlap order with the token ring (1) or in the plain order (0,
// an A/B switch).  The H200 (session 23, ab_fwd.sh, medians of 3 alternating rounds) over plain:
// overlap + token +2.6-7.6 % non-causal (s2k 437 -> 471, s8k 494 -> 519 TFLOP/s), +2-3 % causal,
// fp16 +6 %; overlap without the token +0-2 %; the plain order with a token per GEMM -8 to -12 %.
#ifndef ORCHARD_SM90_FWD64_OVERLAP
#define ORCHARD_SM90_FWD64_OVERLAP 1
#endif
// d64's causal calls with fewer than ORCHARD_SM90_FWD64_CAUSAL_WG2_BELOW_SK keys: 2 consumer
// warpgroups (128-row tiles: a finer diagonal) instead of 3 (an A/B switch; 0: 3 everywhere).
// H200, session 34 (ab_fwd.sh, medians of 4 rounds, all causal calls on 2 WGs): s512 / s1k +10 /
// +15 %, s2k 0.99x, s4k-16k 0.92-0.96x.  Other tiles for causal d64, not kept: 64 keys
// 0.89-0.94x everywhere, 96 keys 0.95-1.005x.
#ifndef ORCHARD_SM90_FWD64_CAUSAL_WG2_BELOW_SK
#define ORCHARD_SM90_FWD64_CAUSAL_WG2_BELOW_SK 2048
#endif
// d128's wide key tile (ORCHARD_SM90_FWD128_WIDE_N keys) from ORCHARD_SM90_FWD128_WIDE_MIN_SK
// keys on (causal: ORCHARD_SM90_FWD128_CAUSAL_WIDE_MIN_SK), 128-key tiles below (A/B switches;
// run_flash_fwd_sm90 says what was measured).
#ifndef ORCHARD_SM90_FWD128_WIDE_N
#define ORCHARD_SM90_FWD128_WIDE_N 192
#endif
#ifndef ORCHARD_SM90_FWD128_WIDE_MIN_SK
#define ORCHARD_SM90_FWD128_WIDE_MIN_SK 2048
#endif
#ifndef ORCHARD_SM90_FWD128_CAUSAL_WIDE_MIN_SK
#define ORCHARD_SM90_FWD128_CAUSAL_WIDE_MIN_SK 8192
#endif
// The d96 bucket (64B-swizzled chunks): d64's 3 consumer WGs on tiles of ORCHARD_SM90_FWD96_WG3_N
// keys (ORCHARD_SM90_FWD96_WG=3), or d128's form (2 WGs, 128-key tiles, wide tiles of
// ORCHARD_SM90_FWD96_WIDE_N keys from d128's thresholds on).  The H200 (session 28, ab_fwd.sh
// MODES=d96, medians of 3 alternating rounds, over the d128 bucket's kernels that ran d96 before):
// 3 WGs x 96 keys +7-15 % non-causal (s2k-16k 514 / 552 / 569 / 583 TFLOP/s), +7-23 % causal, fp16
// +16 %; 2 WGs (192-key tiles from 2k keys) +8-12 %, 2 WGs x 128 keys +5-11 %.  ptxas: 3 WGs on
// 128-key tiles spill 96 B and serialize their wgmmas.
#ifndef ORCHARD_SM90_FWD96_WG
#define ORCHARD_SM90_FWD96_WG 3
#endif
#ifndef ORCHARD_SM90_FWD96_WIDE_N
#define ORCHARD_SM90_FWD96_WIDE_N 192
#endif
#ifndef ORCHARD_SM90_FWD96_WG3_N
#define ORCHARD_SM90_FWD96_WG3_N 96
#endif
// d192's non-causal calls: 96-key tiles from ORCHARD_SM90_FWD192_WIDE_MIN_SK keys on, 64 below
// (an A/B switch; run_flash_fwd_sm90 says what was measured; causal calls always take 96).
#ifndef ORCHARD_SM90_FWD192_WIDE_MIN_SK
#define ORCHARD_SM90_FWD192_WIDE_MIN_SK 1024
#endif
// d256's key tiles: ORCHARD_SM90_FWD256_WIDE_N keys (80: the most whose two K / V stages fit beside
// Q) from ORCHARD_SM90_FWD256_WIDE_MIN_SK keys on, 64 below (A/B switches; run_flash_fwd_sm90 says
// what was measured).
#ifndef ORCHARD_SM90_FWD256_WIDE_N
#define ORCHARD_SM90_FWD256_WIDE_N 80
#endif
#ifndef ORCHARD_SM90_FWD256_WIDE_MIN_SK
#define ORCHARD_SM90_FWD256_WIDE_MIN_SK 2048
#endif
// Cross-tile overlap: the overlap kernels issue the next tile's first QK^T with this tile's last
// PV (one GEMM turn), and run its softmax under that PV, instead of starting each tile with an
// unoverlapped QK^T and softmax. ORCHARD_SM90_FWD_CROSS_TILE: -1 (default) the kernels below, 0
// none, 1 every overlap kernel (A/B switches). H200, session 30 (ab_fwd.sh, medians of 3
// alternating rounds, base vs all-on): d256 non-causal +5-8 % at s1k-16k (64- and 80-key tiles),
// causal on 80-key tiles (s >= 2k) +1.5-3 %, on 64-key tiles (s <= 1k) -1.4 / -2.1 %; d128's
// 128-key non-causal kernel (s < 2k) +7.8 % at s1k; d128's 192-key and causal kernels -0.3 to
// -2.4 %; d64 -0.8 to -3.4 % (causal s512 -7.9 %). d96 / d192 not timed: off.
#ifndef ORCHARD_SM90_FWD_CROSS_TILE
#define ORCHARD_SM90_FWD_CROSS_TILE -1
#endif
// The epilogue's O stores: 1 (default) one 16-byte store per lane per 4 column blocks after a quad
// transpose, 0 four 4-byte stores (an A/B switch). H200, session 30 (ab_fwd.sh, medians of 3
// alternating rounds): skipping O's stores altogether (ORCHARD_SM90_FWD_DIAG_SKIP_O, wrong
// outputs) ran d128 +14 / +9 % at s1k / s2k, +1-2 % at s >= 8k, d256 +8-11 % at s <= 4k: the
// 4-byte stores were most of the s2k forward's deficit to s16k. The 16-byte stores: d128
// +6.5 / +2.3 % at s1k / s2k (causal s2k +2.7 %), 0.98-1.04x at s >= 4k; d256 +1-8 %; d192
// +1.6-6.7 %; d96 +12 % at s1k, +1-3 %; d64 0.99-1.03x; one causal s16k point each at d96
// (0.97x) and d192 (0.94x, 1.00x on a second run) in the noisy one-CTA-per-tile regime.
#ifndef ORCHARD_SM90_FWD_O_STORE16
#define ORCHARD_SM90_FWD_O_STORE16 1
#endif
#ifndef ORCHARD_SM90_FWD_DIAG_SKIP_O
#define ORCHARD_SM90_FWD_DIAG_SKIP_O 0
#endif
// Diagnostic only (wrong outputs): Q loaded for a CTA's first tile only, the later tiles' q_full
// completed by a plain arrival; times what waiting for each tile's Q load costs (H200, session
// 32: +3.9 % d128 s2k, +4.8 % d256 s2k, +1.4-4 % causal s2k / s4k; ~0 at s >= 4k non-causal).
#ifndef ORCHARD_SM90_FWD_DIAG_Q_ONCE
#define ORCHARD_SM90_FWD_DIAG_Q_ONCE 0
#endif
// O staged in shared memory and written by TMA stores instead of stores from registers: the
// consumer warps write O to shared memory (stmatrix, conflict-free) and one thread per warpgroup
// hands it to the copy engine.  Only tiles that leave room for an O buffer beside Q and the K / V
// ring can (d64, d96, d128's 128-key and d192's 64-key tiles; not d128's 192-key or d256's).
// ORCHARD_SM90_FWD_O_TMA: -1 (default) the kernels below, 0 none, 1 every one with room (A/B
// switches).  H200, session 32 (ab_fwd.sh, medians of 3 alternating rounds, over the 16-byte
// register stores): d128's 128-key kernels +2.9 % at s1k, causal +1.2 / +0.4 % at s2k / 4k
// (+2.3 / +1.2 % in a 5-round repeat); d192's 64-key kernel (non-causal to 2k keys) +12.2 / +3.3 % at
// s1k / s2k; d64 0.97-1.006x and d96 0.977-1.022x (3 warpgroups: off).
#ifndef ORCHARD_SM90_FWD_O_TMA
#define ORCHARD_SM90_FWD_O_TMA -1
#endif
// Two Q buffers, so the next tile's Q loads while this tile still reads its own, where the tile
// leaves room beside the K / V ring and the O buffer (d64, d96, d128's 128-key tiles).  With one,
// a WG's next Q can load only once its last QK^T of this tile is done: never reloading Q
// (ORCHARD_SM90_FWD_DIAG_Q_ONCE) measured +2-4 % at s2k.  ORCHARD_SM90_FWD_Q_STAGES: -1 (default)
// d128's 128-key tiles, 1 none, 2 every tile with room (A/B switches).  H200, session 33
// (ab_fwd.sh, medians of 5 / 3 alternating rounds): d128 s1k (128-key tiles) +4.0 / +2.9 % in two
// runs, causal s512-s4k 0.97-1.01x (noise: spreads 3-7 %); d64 0.97 / 0.98x at s1k / s2k and d96
// 0.967x at s2k: off there.
#ifndef ORCHARD_SM90_FWD_Q_STAGES
#define ORCHARD_SM90_FWD_Q_STAGES -1
#endif
// O staged in the V stage of the tile's last key tile where no O buffer fits but a V stage holds
// O (d128's 192-key tiles, 48 KB against 32 KB), instead of stores from registers.  Both WGs'
// last PV must have read the stage first (barrier pv_done); the stage goes back to the producer
// once the TMA stores have read it, which each WG's issuer checks after its next tile's first
// QK^T: the next tile needs that stage only for its second key tile's V.
// ORCHARD_SM90_FWD_O_IN_V: -1 (default) d128's 192-key tiles, 0 none, 1 every tile it fits (A/B
// switches).  H200, session 33: d128 s2k / s4k / s8k / s16k +2.7 / +0.8 / +0.7 / +1.3 %, fp16 s4k
// +1.9 %, causal (192-key from 8k keys) 0.996-1.002x; with the two Q buffers above, s2k +3.6 %.
// Skipping O altogether (ORCHARD_SM90_FWD_DIAG_SKIP_O) measured +4.7 % at d128 s2k (session 32).
#ifndef ORCHARD_SM90_FWD_O_IN_V
#define ORCHARD_SM90_FWD_O_IN_V -1
#endif
// One WG's worth of O buffer, taken by the consumer WGs in turn (WG 0, 1, ... of each tile), where
// the tile leaves room for that but not for a whole O buffer (d256's 64-key tiles, 32 of the 34 KB
// left; d192's 96-key tiles, 24 of 34 KB), instead of stores from registers.  Each WG's issuing
// thread waits for the copy engine to have read its O out before it passes the buffer on (mbarrier
// o_free), so the next WG's staging waits at most for one TMA read.  2-WG tiles only: with 3, one
// barrier's parity cannot tell a WG's turn from two uses earlier (and per-WG barriers, correct
// there, measured d64 0.99-1.03x, d96 0.92-1.03x: nothing to win).
// ORCHARD_SM90_FWD_O_SHARED: -1 (default) d192's tiles (the 96-key ones), 0 none, 1 every tile
// with room and no O buffer of its own (A/B switches).  H200, session 34, with 96-key tiles from
// 1k keys (ORCHARD_SM90_FWD192_WIDE_MIN_SK), over session 33's d192 (5 rounds): s1k / s2k / s4k /
// s8k / s16k +3.3 / +7.2 / +7.2 / +6.2 / +3.2 %, fp16 s4k +5.6 %, d160 +1.9 %, causal 0.995-1.055x
// (two earlier runs: s1k +9-13 %, s8k +5-8 %).  d256's 64-key tiles: s2k 0.96x, the rest 0.99-1.02x:
// off.
#ifndef ORCHARD_SM90_FWD_O_SHARED
#define ORCHARD_SM90_FWD_O_SHARED -1
#endif
// Causal tiles, per consumer WG: the key tiles that none of the WG's 64 rows can see (the first
// ones of its loop, which runs from the diagonal down) are released without their GEMMs (the WG
// still waits for each stage, arrives on its empty barriers and takes its GEMM turns, empty), and
// the diagonal's mask is applied only where the WG's own rows cross it, instead of wherever the
// CTA's first row does.  With 192-row tiles (d64, d96) on 128- / 96-key tiles and 128-row tiles
// on d192's 96 or d256's 80 keys, WG 0 (and WG 1 of 3) sees ~1 key tile fewer per m block.  Not
// with the cross-tile overlap (its next tile's first QK^T is issued before this decision).  An A/B
// switch: 1 on, 0 off.  H200, session 36 (ab_fwd.sh, medians of 4 alternating rounds, over off):
// d64 causal s2k / s4k / s8k / s16k +2.6 / +3.3 / +1.4 / +1.5 %, d192 +2.7 / +0.3 / +2.7 / +2.0 %
// (s1k +4.6 %), d96 +2.1 / +0.5 / +0.6 / +1.3 %, d256's 64-key tiles s512 / s1k +4.8 / +3.9 %.
#ifndef ORCHARD_SM90_FWD_CAUSAL_WG_SKIP
#define ORCHARD_SM90_FWD_CAUSAL_WG_SKIP 1
#endif
// Phantom rows: where the causal kernels' 192-row tiles (d64, d96: 3 consumer WGs) do not divide
// sq, the last m block's WGs whose rows all lie past sq run one key tile instead of every one, and
// rows past sq no longer count for a WG's diagonal (the per-WG skip above).  At sq = 2k (4k) one
// (two) of the last block's three WGs ran all its key tiles for rows never stored, ~6 % of the
// GEMMs, yet alone the real WG is latency-bound, so the time saved is less.  H100, session 51
// (ab_fwd.sh, medians of 3 alternating rounds): d64 causal s2k / 4k / 8k / 16k +3.0 / +0.5 / +1.9 /
// +0.7 %, d96 +0.9 / +1.4 / +1.7 / +7.7 %; in the non-causal 3-WG kernels 0.99-1.007x (d96 s2k /
// s4k 0.990 / 0.991 at 1-2 % spreads): not there.  An A/B switch: 1 on, 0 off.
// (Session 52's hung GPU test was not this skip: a producer brace of the dense-bias change left the
// kernels without attn_bias loading no Q or V, fixed in 5ba0578; test_sm90_causal_phantom_warpgroups
// passed on an H100 in session 53.)
#ifndef ORCHARD_SM90_FWD_PHANTOM_WG_SKIP
#define ORCHARD_SM90_FWD_PHANTOM_WG_SKIP 1
#endif
template <int kD, int kBN, bool kCausal>
inline constexpr bool kFwdSm90CrossTile =
    ORCHARD_SM90_FWD_CROSS_TILE >= 0
        ? ORCHARD_SM90_FWD_CROSS_TILE != 0
        : (kD == 256 && (!kCausal || kBN == 80)) || (kD == 128 && kBN == 128 && !kCausal);
template <int kD, bool kOverlap>
inline constexpr bool kFwdSm90PingPong =
    kOverlap ? kD <= ORCHARD_SM90_FWD_PINGPONG_MAX_D : ORCHARD_SM90_FWD_PLAIN_PINGPONG != 0;

// kWG consumer warpgroups of 64 query rows each (2 or 3; 3 = FA3's 192-row tile at d64).
// kBiasTiles (the kBias kernels): room for a ring of dense attn_bias tiles (attn_bias_tiles.cuh).
template <int kD, int kBNv = default_block_n<kD>(), int kWG = 2, bool kBiasTiles = false>
struct FwdSm90Config {
  static_assert(kD == 64 || kD == 96 || kD == 128 || kD == 192 || kD == 256,
                "sm90 forward: d bucket in {64, 96, 128, 192, 256}");
  static_assert(kBNv % 16 == 0 && kBNv <= 256, "sm90 forward: key tile");
  static_assert(kWG == 2 || kWG == 3, "sm90 forward: 2 or 3 consumer warpgroups");
  static constexpr int kBM = 64 * kWG;  // query rows per CTA
  static constexpr int kBN = kBNv;
  // Q / K / V tiles in column chunks of one swizzle row each (cuda::sm90_tile_swizzle_bytes).
  static constexpr int kSwizzleBytes = cuda::sm90_tile_swizzle_bytes(kD);
  static constexpr int kChunkCols = kSwizzleBytes / 2;
  static constexpr int kChunks = kD / kChunkCols;
  static constexpr int kSlicesPerChunk = kSwizzleBytes / 32;  // k16 slices (32 bytes) per chunk row
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kBM * kD * 2;
  static constexpr int kKVBytes = kBN * kD * 2;  // one K or one V stage
  static constexpr int kQChunkBytes = kBM * kSwizzleBytes, kKVChunkBytes = kBN * kSwizzleBytes;
  // Shared memory, in order: Q (kQStages buffers), the K / V ring, the O buffer (kOStaged; or
  // one WG's part of it, kOShared), the barriers (kBarBytes).  The O buffer has Q's layout
  // (chunks of kBM rows, each WG's 64 rows a TMA store box; kOShared: chunks of 64 rows); it and
  // a second Q buffer are there only where the tile leaves room within the 227 KB an SM gives
  // one CTA, O first.
  static constexpr int kBarBytes = 256;
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kRingBytes = 2 * kStages * kKVBytes;
  static constexpr bool kORoom = 2 * kQBytes + kRingBytes + kBarBytes + 1024 <= kSmemLimit;
  static constexpr bool kOStaged =
      kORoom && (ORCHARD_SM90_FWD_O_TMA >= 0 ? ORCHARD_SM90_FWD_O_TMA != 0
                                             : (kD == 128 && kBN == 128) || (kD == 192 && kBN == 64));
  // The shared O buffer (kOShared): one WG's 64 rows, where a whole O buffer does not fit.
  static constexpr int kOWGBytes = 64 * kD * 2;
  static constexpr bool kOShared = !kOStaged && kWG == 2 &&
                                   (ORCHARD_SM90_FWD_O_SHARED >= 0 ? ORCHARD_SM90_FWD_O_SHARED != 0 : kD == 192) &&
                                   kQBytes + kRingBytes + kOWGBytes + kBarBytes + 1024 <= kSmemLimit;
  static constexpr int kOBytes = kOStaged ? kQBytes : kOShared ? kOWGBytes : 0;
  static constexpr bool kQ2Room = 2 * kQBytes + kOBytes + kRingBytes + kBarBytes + 1024 <= kSmemLimit;
  static constexpr int kQStages =
      kQ2Room && (ORCHARD_SM90_FWD_Q_STAGES >= 0 ? ORCHARD_SM90_FWD_Q_STAGES == 2 : kD == 128 && kBN == 128) ? 2 : 1;
  // O through a V stage instead (the kernel adds: overlap order, no cross-tile carry).
  static constexpr bool kOInVStage =
      !kOStaged && !kOShared && kQStages == 1 && kKVBytes >= kQBytes &&
      (ORCHARD_SM90_FWD_O_IN_V >= 0 ? ORCHARD_SM90_FWD_O_IN_V != 0 : kD == 128 && kBN == 192);
  static constexpr int kKOffset = kQStages * kQBytes;
  static constexpr int kOOffset = kKOffset + kRingBytes;
  // Dense attn_bias tiles (kBM x kBN elements of <= 2 bytes per stage) overlay the O buffer: a
  // call with such a bias writes O from registers (the launcher turns o_by_tma off), so the
  // kBias kernels' layout for row-broadcast masks keeps its O buffer and Q stages.  Two stages
  // where they fit beside Q and the K / V ring, else one (d128's 128-key and d192's 96-key tiles).
  static constexpr int kBiasStageBytes = kBM * kBN * 2;
  static constexpr int kBiasStages =
      !kBiasTiles ? 0 : kOOffset + 2 * kBiasStageBytes + kBarBytes + 1024 <= kSmemLimit ? 2 : 1;
  static constexpr int kBiasOffset = kOOffset;
  static constexpr int kBiasEnd = kBiasOffset + kBiasStages * kBiasStageBytes;
  static constexpr int kBarOffset = kOOffset + kOBytes > kBiasEnd ? kOOffset + kOBytes : kBiasEnd;
  static_assert(kOOffset % 1024 == 0, "sm90 forward: the O buffer needs the swizzle atom's alignment");
  static_assert(!kBiasTiles || !kOInVStage, "sm90 forward: dense bias tiles and O in a V stage");
  // + 1024: the dynamic smem base is only 16-byte aligned; the tiles need 1024 (swizzle atom).
  static constexpr int kSmemBytes = kBarOffset + kBarBytes + 1024;
  static_assert(kSmemBytes <= kSmemLimit, "sm90 forward: the tile's shared memory exceeds what an SM gives one CTA");
  static constexpr int kThreads = 128 * (kWG + 1);
  // setmaxnreg split (64K registers per SM): 24 + 2 x 240 warps' worth with 2 consumer WGs,
  // 32 + 3 x 160 with 3 (the sums must not exceed the launch allocation: a hang otherwise).
  static constexpr int kProducerRegs = kWG == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kWG == 2 ? 240 : 160;
};

__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Per-thread online-softmax state for its 2 rows (g and g + 8 of its warp's 16).
struct RowState {
  float max[2];  // running max of the raw scores (-inf: nothing seen yet)
  float sum[2];  // this thread's partial row sum (quad-reduced only at the end)
};

// Masks the scores of key tile n0 (kBN keys) for this thread's rows: keys >= sk, and with
// kCausal keys > row + causal_offset.  Accumulator layout (wgmma_mma.cuh):
// s[i] -> row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 t + (i % 2).
template <int kBN, bool kCausal>
__device__ __forceinline__ void mask_tile(float (&s)[kBN / 2], int n0, int row0, int sk,
                                          int64_t causal_offset, int t) {
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) {
    const int col = n0 + 8 * (i / 4) + 2 * t + (i % 2);
    const int row = row0 + 8 * ((i / 2) % 2);
    bool masked = col >= sk;
    if (kCausal) masked |= static_cast<int64_t>(col) > row + causal_offset;
    if (masked) s[i] = -INFINITY;
  }
}

// Online softmax of one score tile: updates the running max, turns s into unnormalized
// probabilities exp2(s * scale_log2 - max * scale_log2) and returns each row's correction
// factor for the accumulated O and sum.
template <int kBN>
__device__ __forceinline__ void softmax_tile(float (&s)[kBN / 2], RowState& st, float scale_log2,
                                             float (&corr)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = st.max[r];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row that has seen only masked keys keeps max -inf: subtract 0 so exp2(-inf) = 0.
    const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
    corr[r] = ex2_approx(st.max[r] * scale_log2 - base);  // old max -inf -> 0
    st.max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const float p0 = ex2_approx(fmaf(s[4 * j + 2 * r], scale_log2, -base));
      const float p1 = ex2_approx(fmaf(s[4 * j + 2 * r + 1], scale_log2, -base));
      s[4 * j + 2 * r] = p0;
      s[4 * j + 2 * r + 1] = p1;
      sum += p0 + p1;
    }
    st.sum[r] = st.sum[r] * corr[r] + sum;
  }
}

template <int kN>
__device__ __forceinline__ void rescale_rows(float (&o)[kN], const float (&corr)[2]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) o[i] *= corr[(i / 2) % 2];
}

// P (fp32 accumulator layout) -> 16-bit wgmma A fragments: k16 slice kk is a[kk][0..3] =
// pairs (8kk, 8kk+1), (8kk+2, +3), (8kk+4, +5), (8kk+6, +7) — rows g / g+8, cols 2t / 2t+8.
template <typename T, int kBN>
__device__ __forceinline__ void convert_p(const float (&s)[kBN / 2], uint32_t (&a)[kBN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk)
#pragma unroll
    for (int q = 0; q < 4; ++q) a[kk][q] = pack_pair<T>(s[8 * kk + 2 * q], s[8 * kk + 2 * q + 1]);
}

// The kernels that carry the dropout code (dropout_scores.cuh): those where ptxas (sm_90a) placed it
// without new spill — 2 consumer WGs, no kBias, 64- or 128-key tiles (d192: 96 as well; session 56),
// and with ORCHARD_SM90_FWD_DROPOUT_WG3 the 3-WG 96-key kernels of d64 / d96 (session 62, 0 B).
// Not: kBias (the 3-WG d64 kBias kernels spilled 8 -> 340 B, session 56), d128's 192-key tiles
// (128 B), d256's 80-key one (36 B), d64's 128-key 3-WG kernels: with the code they spilled 4 / 0 B
// (non-causal / causal) and ran 1.4-4.6 % slower without dropout (H100, session 62, ab_fwd.sh MODES=d64,
// medians of 3 rounds, all ten points slower), so d64's dropout calls take a 96-key tile of their
// own (run_flash_fwd_sm90_dropout). d96's 96-key kernels ran 0.97-1.12x with the code (noise level).
// run_flash_fwd_sm90 sends dropout calls to these kernels; launch_flash_fwd_sm90_one declines a
// dropout call for any other.
// Dropout on P packed to 16 bits (cuda::query_rows_drop_packed: an AND per pair) instead of on the fp32 scores
// (drop_scores); in the overlapped loops the Philox calls run under the previous PV, the AND after
// its wait (on the converted P).
#ifndef ORCHARD_SM90_FWD_DROP_PACKED
#define ORCHARD_SM90_FWD_DROP_PACKED 1
#endif
#ifndef ORCHARD_SM90_FWD_DROPOUT_WG3
#define ORCHARD_SM90_FWD_DROPOUT_WG3 1
#endif
template <int kD, int kBN, int kWG, bool kBias>
inline constexpr bool kFwdSm90Dropout =
    !kBias && ((kWG == 2 && (kBN == 64 || kBN == 128 || (kD == 192 && kBN == 96))) ||
               (ORCHARD_SM90_FWD_DROPOUT_WG3 && kWG == 3 && kD <= 96 && kBN == 96));

// ---- persistent tile schedule (the order and why: fwd_sm90_schedule.h) ----
struct FwdTile {
  int m_block, h, b;
  int n_begin, n_end;  // key tiles [n_begin, n_end) some row of the tile sees (empty: none)
};

// x, which the compiler may not assume loop-invariant (the asm is volatile: kept in place).
__device__ __forceinline__ int opaque_int(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Tile index -> (m_block, h, b) (n_begin / n_end not set; m_block -1: a phantom index).
template <bool kCausal, bool kPaired>
__device__ __forceinline__ FwdTile fwd_sm90_coord(const FwdParams& p, const FwdSm90Sched& sc, int idx) {
  FwdTile tl;
  // Opaque copies of the loop-invariant divisors: recomputing the divisions per tile costs a
  // few dozen instructions; hoisted out of the tile loop, their reciprocals stayed live in
  // registers across it (spills at d128 / 192-key tiles).
  const int section = opaque_int(sc.section), num_m_blocks = opaque_int(sc.num_m_blocks);
  const int hq = opaque_int(p.hq);
  int hb;
  if constexpr (kPaired) {
    const FwdSm90Coord c = fwd_sm90_decode(idx, num_m_blocks, sc.num_hb, section, kPaired, true);
    tl.m_block = c.m_block;
    hb = c.hb;
  } else {
    // fwd_sm90_decode's plain order, written out: through the function (same values) ptxas
    // scheduled the kernels differently; this keeps the non-paired kernels' SASS as it was.
    const int per_section = section * num_m_blocks;
    const int sec = idx / per_section;
    const int r = idx - sec * per_section;
    const int hb0 = sec * section;
    const int heads = min(section, sc.num_hb - hb0);
    const int mi = r / heads;
    hb = hb0 + (r - mi * heads);
    tl.m_block = kCausal ? num_m_blocks - 1 - mi : mi;
  }
  tl.b = hb / hq;
  tl.h = hb - tl.b * hq;
  return tl;
}

// The one decoding of a tile index, used by the producer and the consumers alike (they must
// agree on every tile's key range: a tile with n_begin == n_end loads nothing, not even Q).
// kBias: a boolean mask's hidden key tiles at either end are dropped (attn_bias_fragment.cuh).
template <class Cfg, bool kCausal, bool kPaired, bool kBias>
__device__ __forceinline__ FwdTile fwd_sm90_tile(const FwdParams& p, const FwdSm90Sched& sc, int idx) {
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN;
  FwdTile tl = fwd_sm90_coord<kCausal, kPaired>(p, sc, idx);
  if (kPaired && tl.m_block < 0) {  // a phantom index: no keys, no output (the consumers skip it)
    tl.n_begin = tl.n_end = 0;
    return tl;
  }
  const int m0 = tl.m_block * kBM;
  const int sk = p.sk;
  const int64_t coff = p.causal_offset;
  // Key tiles [0, key_end): causal stops after the last row's diagonal.
  int key_end = sk;
  if (kCausal) {
    const int64_t last = static_cast<int64_t>(m0) + kBM - 1 + coff + 1;  // keys < last visible
    key_end = last < 0 ? 0 : (last < sk ? static_cast<int>(last) : sk);
  }
  tl.n_begin = 0;
  tl.n_end = (key_end + kBN - 1) / kBN;
  // The sliding window (features): only the key tiles some row of this tile sees.
  if (cuda::window_active(kCausal, p.window_left, p.window_right)) {
    const cuda::WindowOffsets w = cuda::window_offsets(kCausal, p.window_left, p.window_right, coff);
    const int64_t lo = static_cast<int64_t>(m0) + w.lo, hi = static_cast<int64_t>(m0) + kBM - 1 + w.hi + 1;
    const int64_t k0 = lo < 0 ? 0 : (lo > sk ? sk : lo), k1 = hi < 0 ? 0 : (hi > sk ? sk : hi);
    tl.n_begin = static_cast<int>(k0 / kBN);
    tl.n_end = k0 < k1 ? static_cast<int>((k1 + kBN - 1) / kBN) : tl.n_begin;
  }
  // Varlen's segment form: only the keys of the segments the tile's rows lie in.
  // (Not in the kBias kernels: varlen takes no attn_bias, and the code cost them spills.)
  if (!kBias && p.segment_cu != nullptr) trim_to_segments<kBN>(p, m0, min(m0 + kBM, p.sq) - 1, tl.n_begin, tl.n_end);
  if constexpr (kBias) {
    if (!cuda::sm90_dense_bias(p)) trim_hidden_key_tiles<kBN>(bias_row(p, tl.b, tl.h), sk, tl.n_begin, tl.n_end);
  }
  return tl;
}

template <typename T, int kD, bool kCausal, bool kOverlap, int kBNv, int kWG, bool kBias>
__global__ void __launch_bounds__(FwdSm90Config<kD, kBNv, kWG>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q,
                          const __grid_constant__ CUtensorMap tm_k,
                          const __grid_constant__ CUtensorMap tm_v,
                          const __grid_constant__ CUtensorMap tm_o,
                          const __grid_constant__ CUtensorMap tm_bias, const FwdParams p,
                          const FwdSm90Sched sc, const bool o_by_tma) {
  using Cfg = FwdSm90Config<kD, kBNv, kWG, kBias>;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kChunks = Cfg::kChunks, kStages = Cfg::kStages;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;
  constexpr int kQStages = Cfg::kQStages;
  const uint32_t sQ = sbase;                                 // [kQStages]
  const uint32_t sK = sbase + Cfg::kKOffset;                 // [kStages]
  const uint32_t sV = sK + Cfg::kStages * Cfg::kKVBytes;     // [kStages]
  const uint32_t sO = sbase + Cfg::kOOffset;                 // kOStaged / kOShared only
  const uint32_t sBias = sbase + Cfg::kBiasOffset;           // kBias, dense biases: [kBiasStages]
  const uint32_t bars = sbase + Cfg::kBarOffset;
  auto k_full = [&](int s) { return bars + 8 * s; };
  auto v_full = [&](int s) { return bars + 16 + 8 * s; };
  auto k_empty = [&](int s) { return bars + 32 + 8 * s; };
  auto v_empty = [&](int s) { return bars + 48 + 8 * s; };
  // Q buffer b in one part per consumer WG (its 64 rows), each with its own pair of barriers: a
  // WG's part of a later tile loads once that WG's warps are done with the buffer's last tile.
  auto q_full = [&](int b, int w) { return bars + 64 + 8 * (3 * b + w); };
  auto q_empty = [&](int b, int w) { return bars + 112 + 8 * (3 * b + w); };
  // kOInV: every consumer warp's last PV of a tile done (its V stage then holds O).
  const uint32_t pv_done = bars + 160;
  // kOShared (2 WGs): the shared O buffer's use u (WG u % 2 of the CTA's tile u / 2) read out by
  // the copy engine (phase u, arrived by that use's issuing thread).  A WG waits for phase u - 1
  // by its parity: its own previous use (u - 2) has completed, so the barrier is in phase u - 1 or
  // u, and the parity tells which.
  const uint32_t o_free = bars + 168;
  // Dense attn_bias tiles (kBias; attn_bias_tiles.cuh): stage s loaded / read by every consumer warp.
  auto bias_full = [&](int s) { return bars + 176 + 8 * s; };
  auto bias_empty = [&](int s) { return bars + 192 + 8 * s; };
  static_assert(Cfg::kStages == 2 && kWG <= 3 && kQStages <= 2 && Cfg::kBiasStages <= 2 && 208 <= Cfg::kBarBytes,
                "barrier layout: 2 K / V stages, <= 2 Q buffers x <= 3 WGs, pv_done, o_free, 2 bias stages");
  // A dense bias (rows of its own) comes through the bias stages; a row-broadcast one is read
  // from global memory in the feature pass (attn_bias_fragment.cuh).
  const bool dense_bias = kBias && cuda::sm90_dense_bias(p);
  constexpr int kBiasRing = Cfg::kBiasStages > 0 ? Cfg::kBiasStages : 1;  // (no stages without kBias)
  static_assert(!Cfg::kOShared || kWG == 2, "sm90 forward: the shared O buffer's turns assume 2 WGs");

  const int sq = p.sq, sk = p.sk;
  const int64_t coff = p.causal_offset;
  const bool has_window = cuda::window_active(kCausal, p.window_left, p.window_right);
  constexpr bool kPaired = kFwdSm90PairsCausalTiles<kCausal, kD, kBNv>;

  const int warp = warp_idx_uniform();
  if (threadIdx.x == 0) {
    for (int b = 0; b < kQStages; ++b)
      for (int w = 0; w < kWG; ++w) {
        mbarrier_init(q_full(b, w), 1);
        mbarrier_init(q_empty(b, w), 4);  // one arrival per warp of WG w, after its last QK^T of a tile
      }
    if (Cfg::kOInVStage) mbarrier_init(pv_done, 4 * kWG);
    if (Cfg::kOShared) mbarrier_init(o_free, 1);
    for (int s = 0; s < Cfg::kBiasStages; ++s) {
      mbarrier_init(bias_full(s), 1);
      mbarrier_init(bias_empty(s), 4 * kWG);  // one arrival per consumer warp, once it has read its rows
    }
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(k_full(s), 1);
      mbarrier_init(v_full(s), 1);
      mbarrier_init(k_empty(s), 4 * kWG);  // one arrival per consumer warp
      mbarrier_init(v_empty(s), 4 * kWG);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  // Pipeline counters live for the whole CTA, across tiles: key tiles (K / V ring: stage
  // cnt % kStages, phase (cnt / kStages) & 1) and Q loads (buffer cnt % kQStages, phase
  // (cnt / kQStages) & 1 of its q_full / q_empty).
  // Tiles with no key tile touch neither (no Q load, no ring slot) on either side.
  if (warp < 4) {
    // ---------------- producer ----------------
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (warp == 0 && elect_one_sync()) {
      tma_prefetch_desc(&tm_q);
      tma_prefetch_desc(&tm_k);
      tma_prefetch_desc(&tm_v);
      uint32_t kv_cnt = 0, q_cnt = 0;
      for (int tile = fwd_sm90_first(kPaired, blockIdx.x); tile < sc.total;
           tile = fwd_sm90_next(kPaired, tile, gridDim.x)) {
        const FwdTile tl = fwd_sm90_tile<Cfg, kCausal, kPaired, kBias>(p, sc, tile);
        const int n_tiles = tl.n_end - tl.n_begin;
        if (n_tiles <= 0) continue;
        const int hk = tl.h / (p.hq / p.hkv);
        // Key tiles from the last (the diagonal / ragged end, masked) down to n_begin.  The
        // first K goes out before the wait for Q's slot: its ring stage frees when the
        // previous tile's second-to-last QK^T is done, Q's when its last one is.
        for (int it = 0; it < n_tiles; ++it, ++kv_cnt) {
          const int n = tl.n_end - 1 - it;
          const int s = kv_cnt % kStages;
          const uint32_t ph = (kv_cnt / kStages) & 1;
          mbarrier_wait(k_empty(s), ph ^ 1);
          mbarrier_arrive_expect_tx(k_full(s), Cfg::kKVBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_4d(sK + s * Cfg::kKVBytes + c * Cfg::kKVChunkBytes, &tm_k, k_full(s), Cfg::kChunkCols * c,
                        n * kBN, hk, tl.b);
          if constexpr (kBias) {
            if (dense_bias) {
              // The key tile's bias rows of the whole m block (boxes past sq / sk arrive as zeros),
              // right after its K: the consumers read them before its QK^T.
              const int bs = kv_cnt % kBiasRing;
              const int e = cuda::bias_elem_bytes(cuda::bias_kind(p.attn_bias_dtype));
              mbarrier_wait(bias_empty(bs), ((kv_cnt / kBiasRing) & 1) ^ 1);
              mbarrier_arrive_expect_tx(bias_full(bs), kBM * kBN * e);
              load_bias_tile<kBM, kBN>(sBias + bs * Cfg::kBiasStageBytes, &tm_bias, bias_full(bs), p, e, n * kBN,
                                       tl.m_block * kBM, tl.h, tl.b);
            }
          }
          if (it == 0) {
            // Q of this CTA's q_cnt-th loaded tile into buffer qb, WG by WG: each WG releases its
            // part of the buffer's previous tile (use q_cnt / kQStages - 1 of its q_empty) once its
            // last QK^T of it has completed.
            const int qb = q_cnt % kQStages;
            const uint32_t q_use = q_cnt / kQStages;
            for (int w = 0; w < kWG; ++w) {
              if (q_use > 0) mbarrier_wait(q_empty(qb, w), (q_use - 1) & 1);
              // A WG whose rows all lie past sq (the last m block) gets no load, only the phase:
              // its rows are never stored, so whatever its part of the buffer holds is harmless.
              if ((ORCHARD_SM90_FWD_DIAG_Q_ONCE && q_cnt > 0) || tl.m_block * kBM + 64 * w >= p.sq) {
                mbarrier_arrive(q_full(qb, w));
                continue;
              }
              mbarrier_arrive_expect_tx(q_full(qb, w), Cfg::kQBytes / kWG);
#pragma unroll
              for (int c = 0; c < kChunks; ++c)
                tma_load_4d(sQ + qb * Cfg::kQBytes + c * Cfg::kQChunkBytes + w * 64 * Cfg::kSwizzleBytes, &tm_q,
                            q_full(qb, w), Cfg::kChunkCols * c, tl.m_block * kBM + 64 * w, tl.h, tl.b);
            }
            ++q_cnt;
          }
          mbarrier_wait(v_empty(s), ph ^ 1);
          mbarrier_arrive_expect_tx(v_full(s), Cfg::kKVBytes);
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_load_4d(sV + s * Cfg::kKVBytes + c * Cfg::kKVChunkBytes, &tm_v, v_full(s), Cfg::kChunkCols * c,
                        n * kBN, hk, tl.b);
        }
      }
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<Cfg::kConsumerRegs>();
    const int wg = warp / 4 - 1;  // 0 .. kWG - 1: query rows 64 wg .. 64 wg + 63 of the tile
    const int wi = warp % 4;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float scale_log2 = p.scale * 1.4426950408889634f;
    const bool warp_leader = lane == 0;
    // Features (window / softcap / ALiBi, and the kBias kernels' mask) score every tile through
    // apply_score_mods; the plain path keeps mask_tile on the tiles that cross the key end or the
    // diagonal.
    const bool has_feat = has_window || p.softcap > 0.f || p.alibi_slopes != nullptr || kBias;
    // Dropout (dropout_scores.cuh; sm90_fwd_dropout_form): a CTA-uniform branch after each
    // softmax, no template parameter.
    const bool dropout = kFwdSm90Dropout<kD, kBN, kWG, kBias> && p.dropout_p > 0.f;

    // Descriptors: Q rows of this WG (K-major, chunk c = kk / kSl, 32 bytes per k16 inside);
    // K stage s likewise; V stage s MN-major (k16 slice = 16 key rows of kSw bytes).
    constexpr int kSw = Cfg::kSwizzleBytes, kSl = Cfg::kSlicesPerChunk;
    const uint64_t dq0 = make_desc_kmajor_swizzled<kSw>(sQ + wg * 64 * kSw);
    const uint64_t dk0 = make_desc_kmajor_swizzled<kSw>(sK);
    const uint64_t dv0 = make_desc_mnmajor_swizzled<kSw>(sV, Cfg::kKVChunkBytes);
    // kv_cnt: key tiles consumed (stage and phase read bits 0 and 1 only) and, in the top bits,
    // the Q loads consumed (one register fewer live across the loops): with one Q buffer their
    // parity in bit 31, with two their count mod 4 in bits 30..31 (buffer, then phase).
    uint32_t kv_cnt = 0;
    // The Q buffer of the tile whose Q was waited for last (0 with one buffer).
    auto q_buf = [&]() -> int { return kQStages == 1 ? 0 : static_cast<int>(((kv_cnt >> 30) + 1u) & 1u); };
    float o[kD / 2];
    // The kBias kernels' QK^T accumulates onto s_acc's initial values: a dense attn_bias's staged
    // elements for the key tile, as bias / scale (or 0 / -inf for a boolean mask), so the bias
    // costs the consumers no pass and no registers of its own, and its stage is released at once;
    // zeros for other calls.  (Added before softcap, hence sm90_fwd_call_supported keeps softcap
    // with a dense bias on the sm80 kernels.)  Measured by ptxas: with the first k16 step's
    // accumulate flag a run-time value instead (dense or not), d128's consumers spilled 0.3-3 KB.
    // cnt: the key tile's count in the CTA's ring (its stage and phase).
    auto load_bias_scores = [&](float (&s_acc)[kBN / 2], uint32_t cnt) {
      if (!dense_bias) {
#pragma unroll
        for (int i = 0; i < kBN / 2; ++i) s_acc[i] = 0.f;
      } else if constexpr (kBias) {
        const int bs = cnt % kBiasRing;
        mbarrier_wait(bias_full(bs), (cnt / kBiasRing) & 1);
        bias_tile_scores<kBM, kBN>(sBias + bs * Cfg::kBiasStageBytes, cuda::bias_kind(p.attn_bias_dtype),
                                   1.f / p.scale, s_acc, 64 * wg + 16 * wi, lane);
        __syncwarp();
        if (warp_leader) mbarrier_arrive(bias_empty(bs));
      }
    };
    // kBias: s_acc holds load_bias_scores' values (the first k16 step accumulates onto them).
    auto qk_gemm = [&](float (&s_acc)[kBN / 2], int stage) {
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        const uint32_t off = (kk % kSl) * 32;  // k16 slice inside the chunk row
        Wgmma<kBN, T>::template ss<0, 0>(
            s_acc, desc_advance(dq0, q_buf() * Cfg::kQBytes + (kk / kSl) * Cfg::kQChunkBytes + off),
            desc_advance(dk0, stage * Cfg::kKVBytes + (kk / kSl) * Cfg::kKVChunkBytes + off),
            kk > 0 || kBias);
      }
    };
    auto pv_gemm = [&](const uint32_t (&pa)[kBN / 16][4], int stage) {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk)
        Wgmma<kD, T>::template rs<1>(o, pa[kk], desc_advance(dv0, stage * Cfg::kKVBytes + kk * 16 * kSw), 1);
    };

    // The GEMM token (kFwdSm90PingPong): WG wg waits at barrier 1 + wg (its 128 threads + the
    // previous WG's 128 arrivals) and passes to the next WG's.  The last WG hands WG0 the first
    // turn; all WGs take the same number of turns per tile (overlap: n_tiles + 1, the first QK^T,
    // the n_tiles - 1 steps, the last PV; plain: 2 n_tiles), and WG0 takes the last WG's final
    // hand-off at the end, so no arrival is left.
    constexpr bool kPingPong = kFwdSm90PingPong<kD, kOverlap>;
    auto take_turn = [&] {
      if constexpr (kPingPong) named_barrier_sync(1 + wg, 256);
    };
    auto pass_turn = [&] {
      if constexpr (kPingPong) named_barrier_arrive(1 + (wg + 1 == kWG ? 0 : wg + 1), 256);
    };
    if constexpr (kPingPong) {
      if (wg == kWG - 1) pass_turn();
    }

    constexpr bool kCross = kOverlap && kFwdSm90CrossTile<kD, kBN, kCausal>;
    // ORCHARD_SM90_FWD_CAUSAL_WG_SKIP where the tile shape lets it pay at sq == sk: with as many
    // keys per tile as rows (d64's 2-WG and d128's 128-key tiles) no WG's rows end a key tile
    // early (H200, session 36: 0.97-1.01x there, noise).
    constexpr bool kDiagSkip = ORCHARD_SM90_FWD_CAUSAL_WG_SKIP && kCausal && !kCross && kBM != kBN;
    constexpr bool kOInV = Cfg::kOInVStage && kOverlap && !kCross;
    // ORCHARD_SM90_FWD_PHANTOM_WG_SKIP: in the causal 3-WG kernels a WG whose rows all lie past sq
    // runs one key tile, not all of them.
    constexpr bool kPhantomSkip = ORCHARD_SM90_FWD_PHANTOM_WG_SKIP && kDiagSkip && kWG == 3;
    constexpr bool kWgSkip = kDiagSkip || kPhantomSkip;
    // Scores of key tile n of query tile `tile` (first query row m0, this thread's row0): the
    // feature path or the plain path's mask on tiles crossing the key end or the diagonal.
    // Varlen's segment form: the segment of a thread's first row, looked up once per query tile
    // (H200, session 39, bench/feature_bench.py in two calls: with both rows looked up per key tile
    // the d64 forward ran 0.86x the sm80 kernels' speed and d128 1.27x; this form 1.24x and 1.71x).
    auto segment_span_of = [&](int row0) {
      return !kBias && p.segment_cu != nullptr ? segment_of(p.segment_cu, p.segments, row0) : SegmentSpan{0, 0};
    };
    // span0: varlen's segment form, the segment of this thread's first row (segment_span_of).
    auto score_tile_of = [&](float (&s_acc)[kBN / 2], int n, int tile, int m0, int row0, SegmentSpan span0) {
      auto needs_mask = [&](int n) {
        const int n0 = n * kBN;
        // The first row whose diagonal counts: this WG's (per-WG masks) or the CTA tile's.
        const int64_t r0 = kDiagSkip ? m0 + 64 * wg : m0;
        return n0 + kBN > sk || (kCausal && static_cast<int64_t>(n0) + kBN - 1 > r0 + coff);
      };
      if (has_feat) {
        const FwdTile bh = fwd_sm90_coord<kCausal, kPaired>(p, sc, tile);
        const int b = bh.b, h = bh.h;
        const int n0 = n * kBN;
        const cuda::WindowOffsets w = cuda::window_offsets(kCausal, p.window_left, p.window_right, coff);
        // s_acc[i]: row row0 + dr, col n0 + 2t + dc (mask_tile's layout), col - row = rel0 + dc - dr.
        auto each = [&](auto&& f) {
#pragma unroll
          for (int i = 0; i < kBN / 2; ++i) {
            const int dc = 8 * (i / 4) + (i % 2), dr = 8 * ((i / 2) % 2);
            f(s_acc[i], dc - dr, dc);
          }
        };
        cuda::apply_score_mods(each, p.scale, p.softcap,
                               cuda::alibi_slope_ptr(p.alibi_slopes, p.alibi_batch_stride, b, h), coff, w,
                               cuda::tile_needs_mask_window(n0, kBN, m0, kBM, sk, w), n0 + 2 * t - row0,
                               sk - n0 - 2 * t);
        // (A dense bias is in the scores already: load_bias_scores.)
        if (kBias && !dense_bias) {
          // A boolean tile that shows every key changes no score: skipped on the warp's vote.
          const BiasRow br = bias_row(p, b, h);
          if (br.kind != 0 || !bias_row_shows_keys<kBN>(br, n0, lane)) add_attn_bias_row(br, s_acc, n0 + 2 * t);
        }
      } else if (needs_mask(n)) {
        mask_tile<kBN, kCausal>(s_acc, n * kBN, row0, sk, coff, t);
      }
      if (!kBias && p.segment_cu != nullptr) {
        // Varlen's segment form: each of this thread's two rows sees its own segment's keys only.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // The second row (8 below) usually shares the first one's segment.
          const int row = row0 + 8 * r;
          const SegmentSpan span =
              r == 0 || (row >= span0.lo && row < span0.hi) ? span0 : segment_of(p.segment_cu, p.segments, row);
          mask_outside_segment(s_acc, r, t, span, n * kBN);
        }
      }
    };
    // Dropout of key tile n's P for query tile tile_index, this thread's first row first_row ((b, h) and
    // the Philox key read here, not kept live across the key loop).
    auto drop_tile = [&](float (&s_acc)[kBN / 2], int n, int tile_index, int first_row) {
      if constexpr (kFwdSm90Dropout<kD, kBN, kWG, kBias>) {
        const FwdTile bh = fwd_sm90_coord<kCausal, kPaired>(p, sc, tile_index);
        drop_scores<kBN>(s_acc, dropout_key(p), dropout_batch_head(p, bh.b, bh.h),
                         static_cast<uint32_t>(first_row) + static_cast<uint32_t>(p.dropout_row_offset),
                         static_cast<uint32_t>(n * kBN) + static_cast<uint32_t>(p.dropout_col_offset), t,
                         dropout_keep_threshold(p.dropout_p));
      }
    };
    // The same on P converted to its 16-bit A fragments (ORCHARD_SM90_FWD_DROP_PACKED): the tile's
    // Philox calls, then their drop.
    auto draw_tile_calls = [&](Philox4 (&calls)[kBN / 32], int n, int tile_index, int first_row) {
      if constexpr (kFwdSm90Dropout<kD, kBN, kWG, kBias>) {
        const FwdTile bh = fwd_sm90_coord<kCausal, kPaired>(p, sc, tile_index);
        const DropoutKey key = dropout_key(p);
        cuda::query_rows_calls<kBN>(calls, key.seed, key.offset, dropout_batch_head(p, bh.b, bh.h),
                                    static_cast<uint32_t>(first_row) + static_cast<uint32_t>(p.dropout_row_offset),
                                    static_cast<uint32_t>(n * kBN) + static_cast<uint32_t>(p.dropout_col_offset), t);
      }
    };
    auto drop_packed_tile = [&](uint32_t (&p_a)[kBN / 16][4], int n, int tile_index, int first_row) {
      Philox4 calls[kBN / 32];
      draw_tile_calls(calls, n, tile_index, first_row);
      cuda::query_rows_drop_packed<kBN>(p_a, calls, dropout_keep_threshold(p.dropout_p));
    };
    constexpr bool kDropPacked = ORCHARD_SM90_FWD_DROP_PACKED != 0;
    // P (fp32 scores) to the PV operand p_a, dropped where the call has dropout.
    auto make_p = [&](float (&s_acc)[kBN / 2], uint32_t (&p_a)[kBN / 16][4], int n, int tile_index, int first_row) {
      if (dropout && !kDropPacked) drop_tile(s_acc, n, tile_index, first_row);
      convert_p<T, kBN>(s_acc, p_a);
      if (dropout && kDropPacked) drop_packed_tile(p_a, n, tile_index, first_row);
    };
    // kOInV holds the previous tile's last V stage until this tile's first QK^T: a WG that skipped
    // two key tiles would wait for that stage's refill first (a hang).  WG 0 hides at most
    // ceil((kBM - 64) / kBN) tiles, so one here.
    static_assert(!(kDiagSkip && kOInV) || kBM - 64 <= kBN, "sm90 forward: per-WG skip of more than one tile with O in V");
    // kOInV: this CTA's previous tile left its O in a V stage (the stage of key tile kv_cnt - 1)
    // that still has to go back to the producer once the TMA stores have read it.
    bool o_pending = false;
    uint32_t o_uses = 0;  // kOShared: this WG's uses of the shared O buffer so far
    auto release_o_stage = [&] {
      if constexpr (kOInV) {
        if (o_pending) {
          if (wi == 0 && lane == 0) {
            tma_store_wait_read<0>();
            mbarrier_arrive_cnt(v_empty((kv_cnt - 1) % kStages), 4);  // on behalf of the WG's 4 warps
          }
          o_pending = false;
        }
      }
    };
    // Cross-tile overlap: `carried` says this tile's first key tile was already scored during
    // the previous tile's last PV (its P in pa, its row state in st_carry, its Q waited for).
    bool carried = false;
    uint32_t pa[kBN / 16][4];
    RowState st_carry;

    for (int tile = fwd_sm90_first(kPaired, blockIdx.x); tile < sc.total;
         tile = fwd_sm90_next(kPaired, tile, gridDim.x)) {
      const FwdTile tl = fwd_sm90_tile<Cfg, kCausal, kPaired, kBias>(p, sc, tile);
      if (kPaired && tl.m_block < 0) continue;  // a phantom index (paired order, odd m blocks)
      // ORCHARD_SM90_FWD_CAUSAL_WG_SKIP: the leading key tiles hidden from all of this WG's rows
      // (keys past its last row's diagonal); one tile is always kept, so a WG whose rows see no
      // key at all runs the masked path as before (O 0, LSE -inf).
      int wg_skip = 0;
      if constexpr (kWgSkip)
        wg_skip = fwd_sm90_wg_hidden_tiles(tl.m_block, kBM, wg, kBN, kDiagSkip, coff,
                                           kPhantomSkip ? p.sq : INT64_MAX, tl.n_begin, tl.n_end);
      const int n_tiles = tl.n_end - tl.n_begin - wg_skip, n_end = tl.n_end - wg_skip;
      // (b, h) are recomputed where needed (ALiBi, the epilogue) rather than kept live
      // across the key loop (registers: the 192-key d128 tile spilled).
      const int m0 = tl.m_block * kBM;
      const int row0 = m0 + 64 * wg + 16 * wi + g;  // this thread's first row (second: + 8)
      const SegmentSpan span0 = segment_span_of(row0);
      auto score_tile = [&](float (&s_acc)[kBN / 2], int n) { score_tile_of(s_acc, n, tile, m0, row0, span0); };

      // Per-tile state: O accumulators and the softmax rows start over.
#pragma unroll
      for (int i = 0; i < kD / 2; ++i) o[i] = 0.f;
      RowState st;
      st.max[0] = st.max[1] = -INFINITY;
      st.sum[0] = st.sum[1] = 0.f;

      auto wait_q = [&] {
        if constexpr (kQStages == 1) {
          mbarrier_wait(q_full(0, wg), kv_cnt >> 31);
          kv_cnt ^= 0x80000000u;
        } else {
          const uint32_t seq = kv_cnt >> 30;
          mbarrier_wait(q_full(seq & 1, wg), seq >> 1);
          kv_cnt += 0x40000000u;
        }
      };
      bool carry_next = false;
      int o_stage = -1;  // kOInV: the V stage that takes this tile's O
      if (n_tiles > 0) {
        // Read from lane 0 so ptxas sees a warp-uniform branch around the prologue's wgmmas:
        // the loop-carried flag alone made it serialize them (C7520; causal -17..-29 %).
        if constexpr (kCross) carried = __shfl_sync(0xffffffffu, int(carried), 0) != 0;
        if (!carried) wait_q();
        // The skipped key tiles: each stage waited for (so the arrivals count in its phase) and
        // released, and this WG's GEMM turns for them taken empty (overlap: one per key tile,
        // plain: two), so the token ring stays in step.
        for (int j = 0; j < wg_skip; ++j, ++kv_cnt) {
          const int s = kv_cnt % kStages;
          const uint32_t ph = (kv_cnt / kStages) & 1;
          mbarrier_wait(k_full(s), ph);
          mbarrier_wait(v_full(s), ph);
          if (dense_bias) mbarrier_wait(bias_full(kv_cnt % kBiasRing), (kv_cnt / kBiasRing) & 1);
          __syncwarp();
          if (warp_leader) {
            mbarrier_arrive(k_empty(s));
            mbarrier_arrive(v_empty(s));
            if (dense_bias) mbarrier_arrive(bias_empty(kv_cnt % kBiasRing));
          }
          for (int turn = 0; turn < (kOverlap ? 1 : 2); ++turn) {
            take_turn();
            pass_turn();
          }
        }
        if constexpr (!kOverlap) {
          for (int it = 0; it < n_tiles; ++it, ++kv_cnt) {
            const int n = n_end - 1 - it;
            const int s = kv_cnt % kStages;
            const uint32_t ph = (kv_cnt / kStages) & 1;
            float sacc[kBN / 2];
            if constexpr (kBias) load_bias_scores(sacc, kv_cnt);
            mbarrier_wait(k_full(s), ph);
            take_turn();
            wgmma_fence();
            qk_gemm(sacc, s);
            wgmma_commit();
            pass_turn();
            wgmma_wait<0>();
            fence_operands(sacc);
            __syncwarp();
            if (warp_leader) {
              mbarrier_arrive(k_empty(s));
              if (it == n_tiles - 1) mbarrier_arrive(q_empty(q_buf(), wg));  // last QK^T of the tile done: Q free
            }
            score_tile(sacc, n);
            float corr[2];
            softmax_tile<kBN>(sacc, st, scale_log2, corr);
            rescale_rows(o, corr);
            uint32_t pa[kBN / 16][4];
            make_p(sacc, pa, n, tile, row0);
            mbarrier_wait(v_full(s), ph);
            take_turn();
            wgmma_fence();
            pv_gemm(pa, s);
            wgmma_commit();
            pass_turn();
            wgmma_wait<0>();
            fence_operands(o);
            __syncwarp();
            if (warp_leader) mbarrier_arrive(v_empty(s));
          }
        } else {
          // Prologue: S and P of the first tile (done already when carried).
          if (carried) {
            st = st_carry;
          } else {
            const int s = kv_cnt % kStages;
            const uint32_t ph = (kv_cnt / kStages) & 1;
            float sacc[kBN / 2];
            if constexpr (kBias) load_bias_scores(sacc, kv_cnt);
            mbarrier_wait(k_full(s), ph);
            take_turn();
            wgmma_fence();
            qk_gemm(sacc, s);
            wgmma_commit();
            pass_turn();
            release_o_stage();  // the previous tile's O stage, while this QK^T runs
            wgmma_wait<0>();
            fence_operands(sacc);
            __syncwarp();
            if (warp_leader) {
              mbarrier_arrive(k_empty(s));
              if (n_tiles == 1) mbarrier_arrive(q_empty(q_buf(), wg));
            }
            score_tile(sacc, n_end - 1);
            float corr[2];
            softmax_tile<kBN>(sacc, st, scale_log2, corr);  // o is 0: no rescale needed
            make_p(sacc, pa, n_end - 1, tile, row0);
          }
          for (int it = 1; it < n_tiles; ++it) {
            const int n = n_end - 1 - it;
            const uint32_t c = kv_cnt + it, cp = c - 1;
            const int s = c % kStages, sp = cp % kStages;
            const uint32_t ph = (c / kStages) & 1, php = (cp / kStages) & 1;
            float sacc[kBN / 2];
            if constexpr (kBias) load_bias_scores(sacc, c);
            mbarrier_wait(k_full(s), ph);
            take_turn();
            wgmma_fence();
            qk_gemm(sacc, s);
            wgmma_commit();
            mbarrier_wait(v_full(sp), php);
            pv_gemm(pa, sp);  // P of the previous tile, still unscaled by this tile's max
            wgmma_commit();
            pass_turn();
            wgmma_wait<1>();  // S of this tile is ready; PV still runs
            fence_operands(sacc);
            __syncwarp();
            if (warp_leader) {
              mbarrier_arrive(k_empty(s));
              if (it == n_tiles - 1) mbarrier_arrive(q_empty(q_buf(), wg));  // last QK^T of the tile done: Q free
            }
            score_tile(sacc, n);
            float corr[2];
            softmax_tile<kBN>(sacc, st, scale_log2, corr);
            // After the wait for PV(it - 1): O rescaled, its V stage returned.
            auto after_pv_wait = [&] {
              fence_operands(o);
              __syncwarp();
              if (warp_leader) mbarrier_arrive(v_empty(sp));
              rescale_rows(o, corr);
            };
            if (kDropPacked && dropout) {
              // The Philox calls under PV(it - 1); their drop once P is converted after its wait.
              // (Converting into a second fragment under PV and copying it to pa after the wait
              // made ptxas serialize the wgmmas, C7513.)
              Philox4 calls[kBN / 32];
              draw_tile_calls(calls, n, tile, row0);
              fence_operands(sacc);
              fence_operands(corr);
              wgmma_wait<0>();  // PV(it - 1) done: O and pa may be touched
              after_pv_wait();
              convert_p<T, kBN>(sacc, pa);
              cuda::query_rows_drop_packed<kBN>(pa, calls, dropout_keep_threshold(p.dropout_p));
            } else {
              if (!kDropPacked && dropout) drop_tile(sacc, n, tile, row0);  // (under PV(it - 1) as well)
              // Pin the softmax before the wait below: plain arithmetic may otherwise be scheduled
              // after it (seen in SASS), which serializes softmax behind PV again.
              fence_operands(sacc);
              fence_operands(corr);
              wgmma_wait<0>();  // PV(it - 1) done: O and pa may be touched
              after_pv_wait();
              convert_p<T, kBN>(sacc, pa);
            }
          }
          // Epilogue GEMM: PV of the last tile; then its V stage goes back to the producer
          // (it refills it with the next tile's keys: without this arrival the ring hangs).
          const uint32_t cl = kv_cnt + n_tiles - 1;
          const int sl = cl % kStages;
          const uint32_t phl = (cl / kStages) & 1;
          kv_cnt += n_tiles;
          // The next tile of this CTA, if it has key tiles: its first QK^T joins this PV.
          int next = 0;
          FwdTile tn{};
          if constexpr (kCross) {
            next = fwd_sm90_next(kPaired, tile, gridDim.x);
            if (next < sc.total) {
              tn = fwd_sm90_tile<Cfg, kCausal, kPaired, kBias>(p, sc, next);
              carry_next = !(kPaired && tn.m_block < 0) && tn.n_end > tn.n_begin;
            }
          }
          if (carry_next) {
            wait_q();
            const int s = kv_cnt % kStages;
            const uint32_t ph = (kv_cnt / kStages) & 1;
            float sacc[kBN / 2];
            if constexpr (kBias) load_bias_scores(sacc, kv_cnt);
            mbarrier_wait(k_full(s), ph);
            mbarrier_wait(v_full(sl), phl);
            take_turn();
            wgmma_fence();
            qk_gemm(sacc, s);
            wgmma_commit();
            pv_gemm(pa, sl);
            wgmma_commit();
            pass_turn();
            wgmma_wait<1>();  // the next tile's S is ready; this tile's last PV still runs
            fence_operands(sacc);
            __syncwarp();
            if (warp_leader) {
              mbarrier_arrive(k_empty(s));
              if (tn.n_end - tn.n_begin == 1) mbarrier_arrive(q_empty(q_buf(), wg));
            }
            const int m0n = tn.m_block * kBM;
            const int row0n = m0n + 64 * wg + 16 * wi + g;
            score_tile_of(sacc, tn.n_end - 1, next, m0n, row0n, segment_span_of(row0n));
            st_carry.max[0] = st_carry.max[1] = -INFINITY;
            st_carry.sum[0] = st_carry.sum[1] = 0.f;
            float corr[2];
            softmax_tile<kBN>(sacc, st_carry, scale_log2, corr);  // its o starts at 0: no rescale
            auto after_pv_wait = [&] {
              fence_operands(o);
              __syncwarp();
              if (warp_leader) mbarrier_arrive(v_empty(sl));
            };
            if (kDropPacked && dropout) {  // as in the key loop: the calls under this tile's last PV
              Philox4 calls[kBN / 32];
              draw_tile_calls(calls, tn.n_end - 1, next, row0n);
              fence_operands(sacc);
              wgmma_wait<0>();  // this tile's O is final; pa may be overwritten
              after_pv_wait();
              convert_p<T, kBN>(sacc, pa);
              cuda::query_rows_drop_packed<kBN>(pa, calls, dropout_keep_threshold(p.dropout_p));
            } else {
              if (!kDropPacked && dropout) drop_tile(sacc, tn.n_end - 1, next, row0n);
              fence_operands(sacc);
              wgmma_wait<0>();  // this tile's O is final; pa may be overwritten
              after_pv_wait();
              convert_p<T, kBN>(sacc, pa);
            }
          } else {
            mbarrier_wait(v_full(sl), phl);
            take_turn();
            wgmma_fence();
            pv_gemm(pa, sl);
            wgmma_commit();
            pass_turn();
            wgmma_wait<0>();
            fence_operands(o);
            __syncwarp();
            // kOInV: the stage is kept for O (released after its stores have read it), and
            // pv_done tells both WGs when every warp's last PV has read its V.
            if (kOInV && o_by_tma) o_stage = sl;
            if (warp_leader) mbarrier_arrive(kOInV && o_by_tma ? pv_done : v_empty(sl));
          }
        }
      }
      release_o_stage();  // a tile without keys: the previous tile's O stage, if still held

      // Epilogue: normalize, LSE (natural log), O as 16-bit pairs (rows past sq not written).
      // Meanwhile the producer already loads the next tile's K / V (and Q, once every consumer
      // warp has released it).
      const FwdTile bh = fwd_sm90_coord<kCausal, kPaired>(p, sc, tile);
      const int b = bh.b, h = bh.h;
      float* lse = static_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;
      T* og = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
      // 16-byte stores (ORCHARD_SM90_FWD_O_STORE16): a quad's four 4-byte pairs of four column
      // blocks transposed so each lane writes one block's 8 columns; needs O 16-byte aligned with
      // a row stride of whole 16 bytes (uniform per tile), else the 4-byte stores.
      const bool store16 = ORCHARD_SM90_FWD_O_STORE16 && rows_allow_store16(og, p.o_row_stride);
      float inv[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float l = st.sum[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        // Only an exact 0 sum means "no visible key": a NaN one (a NaN in the row's q) stays NaN
        // in out and LSE, as on the CPU and the decode kernels.
        inv[r] = l != 0.f ? 1.f / l : 0.f;
        float lse_l2 = l != 0.f ? st.max[r] * scale_log2 + __log2f(l) : -INFINITY;
        if (p.sink != nullptr) {
          // Attention sink (params.h): exp(sink) joins the row's denominator, the sum taken in
          // units of max(row max, sink) (the sm80 epilogue's form); a row that saw no key
          // outputs 0 with LSE = sink.
          const float sink_l2 = p.sink[h] * 1.4426950408889634f;
          const float mx = st.max[r] * scale_log2;  // -inf for a row that saw no key
          const float top = fmaxf(mx, sink_l2);
          const float a = l > 0.f ? ex2_approx(mx - top) : 0.f;
          const float lt = fmaf(l, a, ex2_approx(sink_l2 - top));
          inv[r] = a / lt;
          lse_l2 = top + __log2f(lt);
        }
        if (dropout) inv[r] *= 1.f / (1.f - p.dropout_p);  // the kept elements' 1 / (1 - p)
        const int row = row0 + 8 * r;
        if (row < sq && t == 0) lse[row] = lse_l2 * 0.6931471805599453f;
      }
      // O staged in shared memory (kOStaged, kOShared, kOInV): this WG's 64 rows, normalized,
      // written (stmatrix) at o_rows, column chunk c at o_rows + c * chunk_bytes, fenced for the
      // async proxy, and sent by the WG's issuing thread as one TMA box per chunk (rows past sq and
      // columns past d clipped by the map).  Named barriers 1 + kWG + wg (the GEMM token ring
      // has 1 .. kWG).
      const bool o_issuer = wi == 0 && lane == 0;
      auto send_o = [&](uint32_t o_rows, uint32_t chunk_bytes) {
        stage_fragment_rows<T, kD, kSw>(o, inv, o_rows, chunk_bytes, wi, lane);
        fence_proxy_async_smem();
        named_barrier_sync(1 + kWG + wg, 128);
        if (o_issuer) {
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
            tma_store_4d(&tm_o, o_rows + c * chunk_bytes, Cfg::kChunkCols * c, m0 + 64 * wg, h, b);
          tma_store_commit();
        }
      };
      if constexpr (Cfg::kOStaged) {
        if (o_by_tma) {
          // Through this WG's part of the O buffer, once the copy engine has read the previous
          // tile's O out of it (the issuer waits, the barrier holds the WG until it has).
          if (o_issuer) tma_store_wait_read<0>();
          named_barrier_sync(1 + kWG + wg, 128);
          send_o(sO + wg * 64 * kSw, Cfg::kQChunkBytes);
          carried = carry_next;
          continue;
        }
      }
      if constexpr (Cfg::kOShared) {
        if (o_by_tma) {
          // Through the shared buffer (its chunks 64 rows apart), in turn: use u = 2 * o_uses + wg
          // waits for the previous use's O to have been read out, and hands the buffer on once
          // the copy engine has read this one.
          const uint32_t u = 2 * o_uses + wg;
          if (u > 0) mbarrier_wait(o_free, (u - 1) & 1u);
          send_o(sO, 64 * kSw);
          if (o_issuer) {
            tma_store_wait_read<0>();
            mbarrier_arrive(o_free);
          }
          ++o_uses;
          carried = carry_next;
          continue;
        }
      }
      if constexpr (kOInV) {
        if (o_stage >= 0) {
          // Through this WG's 16 KB of the V stage o_stage, once every consumer warp's last PV has
          // read that stage (pv_done's phase of this tile: its Q parity bit, flipped at this
          // tile's wait_q, inverted).
          mbarrier_wait(pv_done, (kv_cnt >> 31) ^ 1u);
          fence_proxy_async_smem();  // generic writes after the async proxy's (wgmma's) reads
          send_o(sV + o_stage * Cfg::kKVBytes + wg * kChunks * 64 * kSw, 64 * kSw);
          o_pending = true;
          carried = carry_next;
          continue;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        T* orow = og + static_cast<int64_t>(row) * p.o_row_stride;
        // Diagnostic only (ORCHARD_SM90_FWD_DIAG_SKIP_O=1, wrong outputs): O's normalization and
        // stores skipped by a run-time branch the compiler cannot fold (a stride is never
        // negative), so the code stays as built; times the epilogue's share.
        if (ORCHARD_SM90_FWD_DIAG_SKIP_O && p.o_row_stride >= 0) continue;
        store_fragment_row<T, kD>(o, r, inv[r], orow, row < sq, p.d, t, store16);
      }
      carried = carry_next;
    }
    // The copy engine must have read the last O out of shared memory before the CTA exits.
    if constexpr (Cfg::kOStaged || Cfg::kOShared || kOInV) {
      if (o_by_tma && wi == 0 && lane == 0) tma_store_wait_all<0>();
    }
    if constexpr (kPingPong) {
      if (wg == 0) take_turn();  // the last WG's final hand-off (its first, if this CTA had no tile)
    }
  }
}

// (b, h) pairs per schedule section (fwd_sm90_tile): causal, as many GQA groups as keep their
// K and V (4 * sk * d bytes per kv head, 16-bit) within 32 MB of L2, a power of 2 (FA3's
// choice); not causal, 1 (m_block innermost).
inline int fwd_sm90_section(const FwdParams& p, bool causal) {
  if (!causal) return 1;
  const int64_t kv_head_bytes = 4 * static_cast<int64_t>(p.sk) * p.d;
  const int64_t budget = int64_t{32} << 20;
  int kv_heads = 1;
  while (kv_head_bytes > 0 && int64_t{2} * kv_heads * kv_head_bytes <= budget) kv_heads *= 2;
  const int64_t s = static_cast<int64_t>(kv_heads) * (p.hq / p.hkv);
  const int64_t hb = static_cast<int64_t>(p.hq) * p.b;
  return static_cast<int>(s < hb ? s : hb);
}

// Host launcher of the kCausal kernel.  Returns false without launching when the tensor maps
// cannot be encoded (the caller then falls back); launch errors are left to the caller's check.
template <typename T, int kD, bool kCausal, bool kOverlap, int kBNv = default_block_n<kD>(), int kWG = 2,
          bool kBias = false>
bool launch_flash_fwd_sm90_one(const FwdParams& p) {
  using Cfg = FwdSm90Config<kD, kBNv, kWG, kBias>;
  if (p.d > kD || p.d % 8 != 0 || cuda::value_dim(p) != p.d) return false;
  if (p.dropout_p > 0.f && !kFwdSm90Dropout<kD, Cfg::kBN, kWG, kBias>) return false;  // no dropout code
  const int64_t num_m_blocks = (static_cast<int64_t>(p.sq) + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t total = num_m_blocks * p.hq * p.b;
  if (total > INT32_MAX / 4) return false;  // tile indices (paired: + 2 * gridDim.x, + 1) are ints
  // The maps' width is the true d: TMA zero-fills the tile columns d..kD-1.
  CUtensorMap tq, tk, tv;
  constexpr int kCols = Cfg::kChunkCols;  // the box width: one swizzle row
  if (!make_attn_map<T>(&tq, p.q, p.d, p.sq, p.hq, p.b, p.q_row_stride, p.q_head_stride, p.q_batch_stride, 64,
                        kCols) ||
      !make_attn_map<T>(&tk, p.k, p.d, p.sk, p.hkv, p.b, p.k_row_stride, p.k_head_stride, p.k_batch_stride, Cfg::kBN,
                        kCols) ||
      !make_attn_map<T>(&tv, p.v, p.d, p.sk, p.hkv, p.b, p.v_row_stride, p.v_head_stride, p.v_batch_stride, Cfg::kBN,
                        kCols))
    return false;
  if (total == 0) return true;
  // O by TMA stores (kOStaged, kOShared, kOInVStage) where its map encodes: 16-byte rows (cuda::rows_vec16;
  // rows counted as 2, since the map steps the row stride even when sq is 1).
  CUtensorMap to{};
  bool o_by_tma = false;
  // A dense bias's stages overlay the O buffer (FwdSm90Config): O from registers then.
  CUtensorMap tb{};
  const bool dense_bias = kBias && cuda::sm90_dense_bias(p);
  if (dense_bias && !make_bias_map(&tb, p, Cfg::kBM)) return false;
  if constexpr (Cfg::kOStaged || Cfg::kOShared || Cfg::kOInVStage) {
    o_by_tma = !dense_bias && cuda::rows_vec16(p.out, p.o_batch_stride, p.o_row_stride, p.o_head_stride, p.b, 2, p.hq, p.d) &&
               make_attn_map<T>(&to, p.out, p.d, p.sq, p.hq, p.b, p.o_row_stride, p.o_head_stride,
                                p.o_batch_stride, 64, kCols);
  }
  // Persistent (one CTA per SM, the smem of one CTA fills it, each striding over the tiles)
  // where it measured faster (H200, session 14, against one CTA per tile, alternating binaries):
  // not causal +0.3..+0.6 % at s8k, +2 % at s4k, +4..7 % at s2k, +21..24 % at s512 (d64 /
  // d128); causal kernels in the paired order always (kFwdSm90PairsCausalTiles); the d128
  // 192-key causal kernel in the plain order at sq <= 4096 (+1..4 % at s4k, +30 % at s512),
  // else one CTA per tile (the plain stride's blind assignment of unequal causal tiles measured
  // -4.4 % at s8k; the hardware's greedy dispatch balances them better).
  constexpr bool kPaired = kFwdSm90PairsCausalTiles<kCausal, kD, kBNv>;
  const bool persistent = !kCausal || kPaired || p.sq <= 4096;
  FwdSm90Sched sc;
  sc.num_m_blocks = static_cast<int>(num_m_blocks);
  sc.num_hb = p.hq * p.b;
  sc.section = persistent ? fwd_sm90_section(p, kCausal) : 1;
  sc.total = static_cast<int>(fwd_sm90_total(sc.num_m_blocks, sc.num_hb, kPaired));
  const int units = kPaired ? sc.total / 2 : sc.total;  // what the CTAs stride over
  const int sms = persistent ? cuda::current_device_attribute<cudaDevAttrMultiProcessorCount>() : 0;
  const int grid = sms > 0 && sms < units ? sms : units;
  auto kernel = flash_fwd_sm90_kernel<T, kD, kCausal, kOverlap, kBNv, kWG, kBias>;
  cuda::set_max_dynamic_smem(kernel, Cfg::kSmemBytes);  // once per (kernel, device): launch.h
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, static_cast<cudaStream_t>(p.stream)>>>(tq, tk, tv, to, tb, p,
                                                                                     sc, o_by_tma);
  return true;
}

// Both kernels (causal and not) of one configuration.
template <typename T, int kD, bool kOverlap = true, int kBNv = default_block_n<kD>(), int kWG = 2,
          bool kBias = false>
bool launch_flash_fwd_sm90(const FwdParams& p) {
  return p.causal ? launch_flash_fwd_sm90_one<T, kD, true, kOverlap, kBNv, kWG, kBias>(p)
                  : launch_flash_fwd_sm90_one<T, kD, false, kOverlap, kBNv, kWG, kBias>(p);
}

}  // namespace orchard::sm90

// ---- library entry (instantiated by flash_fwd_sm90_<dtype>_d<d>.cu, built only for sm_90a) ----

namespace orchard::cuda {

// Dropout calls (ORCHARD_SM90_DROPOUT; sm90_fwd_takes_dropout) but d96's: the kernels with its code
// (sm90::kFwdSm90Dropout), else false (the sm80 kernels). d96's take the plain dispatch below, whose
// kernels carry it (with ORCHARD_SM90_FWD_DROPOUT_WG3). d64's 96-key 3-WG tile: 1.09-1.36x the sm80
// forward with the packed drop (session 63, H100; 0.93-1.07x on fp32 scores).
template <typename T, int kD>
bool run_flash_fwd_sm90_dropout(const FwdParams& p) {
  if (p.attn_bias != nullptr) return false;
  if constexpr (kD == 128 || kD == 256) {
    return sm90::launch_flash_fwd_sm90<T, kD, true>(p);  // 128 / 64 keys
  } else if constexpr (kD == 192) {
    if (p.causal) return sm90::launch_flash_fwd_sm90_one<T, 192, true, true, 96>(p);
    return p.sk >= ORCHARD_SM90_FWD192_WIDE_MIN_SK ? sm90::launch_flash_fwd_sm90_one<T, 192, false, true, 96>(p)
                                                   : sm90::launch_flash_fwd_sm90_one<T, 192, false, true, 64>(p);
  } else if constexpr (kD == 64) {
    constexpr bool kOverlap = ORCHARD_SM90_FWD64_OVERLAP != 0;
    return p.causal && p.sk < ORCHARD_SM90_FWD64_CAUSAL_WG2_BELOW_SK
               ? sm90::launch_flash_fwd_sm90_one<T, 64, true, kOverlap, 128, 2>(p)
               : sm90::launch_flash_fwd_sm90<T, 64, kOverlap, 96, 3>(p);
  } else {
    return false;
  }
}

template <typename T, int kD>
bool run_flash_fwd_sm90(const FwdParams& p) {
  // Measured on the H200 (bench/NOTES.md, "sm90 attention forward"; sm90_attn_bench variants):
  // - d64: 3 consumer warpgroups (192-row CTAs, FA3's d64 tile): +32 % / +16 % (non-causal /
  //   causal, s8k) and +17 % / +12 % at s2k over 2 warpgroups (session 12); the intra-warpgroup
  //   overlap alone was within 3 % of the plain order there (it lost 10-15 % with 2 WGs), the
  //   overlap with the GEMM token ring +2-8 % (session 23, ORCHARD_SM90_FWD64_OVERLAP);
  // - d128: overlap + the GEMM token (session 23: +2-6 %); 192-key tiles, re-timed with the token
  //   (session 24, ab_fwd.sh, medians of 3-4 alternating rounds, against a switch at 4096 keys for
  //   both): not causal +3.6 / +4.2 % at 2k keys, 128 keys -2.6 % at 4k and -5 % at 8k-16k, 176
  //   keys -2 %, 160 keys -3 to -5 %; causal, 128 keys +5.6 / +6.2 % at 4k, equal at 8k-16k, while
  //   192 lose 6 % at 2k (fewer, longer tiles: worse causal tails).  Hence wide tiles from 2048
  //   keys on (8192 causal);
  // - d96 bucket (d 72..96, 64B-swizzled chunks): 3 WGs x 96-key tiles (ORCHARD_SM90_FWD96_WG says
  //   what was measured);
  // - d192 bucket (d 136..192): overlap; causal 96-key tiles +9 % (d192) / +7 % (d160) over 64
  //   (session 12); non-causal 96-key tiles from 2049 keys on: +9 / +10 / +15 % at s4k / s8k /
  //   s16k, d160 +14 %, fp16 +5 % over 64 (session 17, medians of 3; 80 keys within 2 % of 96
  //   to s4k, 2-4 % behind above; 112 behind 96), while 64 stayed 3 % ahead at 2k keys; since
  //   the 96-key tiles stage O through a shared buffer (session 34), 96 from 1024 keys on: +9-13 %
  //   at s1k, +7 % at s2k over 64 (which stages a whole O buffer);
  // - d256: overlap; 80-key tiles from 2048 keys on, 64 below (session 28, ab_fwd.sh MODES=d256,
  //   medians of 5 alternating rounds, 80 over 64: non-causal s2k / 4k 1.00 / 1.01x, s8k / 16k
  //   +2.4 / +3.3 %, causal s2k-16k +3.3 / +3.3 / +4.5 / +13.6 %, fp16 s4k 1.00x, but s1k -6.5 %).
  bool launched;
  if (p.dropout_p > 0.f && kD != 96) {
    launched = run_flash_fwd_sm90_dropout<T, kD>(p);
  } else if (p.attn_bias != nullptr) {
    // attn_bias: the kBias kernels (the bias read in the feature pass), one configuration per
    // bucket: the default tile (d64: 3 WGs; d192: 96 keys causal, 64 not), causal or not.
    if constexpr (kD == 64)
      launched = sm90::launch_flash_fwd_sm90<T, 64, ORCHARD_SM90_FWD64_OVERLAP != 0, 128, 3, true>(p);
    else if constexpr (kD == 192)
      launched = p.causal ? sm90::launch_flash_fwd_sm90_one<T, 192, true, true, 96, 2, true>(p)
                          : sm90::launch_flash_fwd_sm90_one<T, 192, false, true, 64, 2, true>(p);
    else if constexpr (kD == 96 && ORCHARD_SM90_FWD96_WG == 3)
      launched = sm90::launch_flash_fwd_sm90<T, 96, true, ORCHARD_SM90_FWD96_WG3_N, 3, true>(p);
    else
      launched = sm90::launch_flash_fwd_sm90<T, kD, true, sm90::default_block_n<kD>(), 2, true>(p);
  } else if constexpr (kD == 64) {
    constexpr bool kOverlap = ORCHARD_SM90_FWD64_OVERLAP != 0;
    launched = p.causal && p.sk < ORCHARD_SM90_FWD64_CAUSAL_WG2_BELOW_SK
                   ? sm90::launch_flash_fwd_sm90_one<T, 64, true, kOverlap, 128, 2>(p)
                   : sm90::launch_flash_fwd_sm90<T, 64, kOverlap, 128, 3>(p);
  } else if constexpr (kD == 96) {
    if constexpr (ORCHARD_SM90_FWD96_WG == 3) {
      launched = sm90::launch_flash_fwd_sm90<T, 96, true, ORCHARD_SM90_FWD96_WG3_N, 3>(p);
    } else {
      const int wide_from = p.causal ? ORCHARD_SM90_FWD128_CAUSAL_WIDE_MIN_SK : ORCHARD_SM90_FWD128_WIDE_MIN_SK;
      launched = p.sk >= wide_from ? sm90::launch_flash_fwd_sm90<T, 96, true, ORCHARD_SM90_FWD96_WIDE_N>(p)
                                   : sm90::launch_flash_fwd_sm90<T, 96, true>(p);
    }
  } else if constexpr (kD == 128) {
    const int wide_from = p.causal ? ORCHARD_SM90_FWD128_CAUSAL_WIDE_MIN_SK : ORCHARD_SM90_FWD128_WIDE_MIN_SK;
    launched = p.sk >= wide_from ? sm90::launch_flash_fwd_sm90<T, 128, true, ORCHARD_SM90_FWD128_WIDE_N>(p)
                                 : sm90::launch_flash_fwd_sm90<T, 128, true>(p);
  } else if constexpr (kD == 192) {
    if (p.causal)
      launched = sm90::launch_flash_fwd_sm90_one<T, 192, true, true, 96>(p);
    else
      launched = p.sk >= ORCHARD_SM90_FWD192_WIDE_MIN_SK ? sm90::launch_flash_fwd_sm90_one<T, 192, false, true, 96>(p)
                                                         : sm90::launch_flash_fwd_sm90_one<T, 192, false, true, 64>(p);
  } else {
    // Window / softcap / ALiBi take the wide tiles too (test_sm90_features_wide_key_tiles, H200).
    launched = p.sk >= ORCHARD_SM90_FWD256_WIDE_MIN_SK
                   ? sm90::launch_flash_fwd_sm90<T, 256, true, ORCHARD_SM90_FWD256_WIDE_N>(p)
                   : sm90::launch_flash_fwd_sm90<T, 256, true>(p);
  }
  if (!launched) return false;
  check_launch("flash_fwd_sm90_kernel");
  return true;
}

}  // namespace orchard::cuda
