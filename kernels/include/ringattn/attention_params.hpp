// Params structs for the attention problem families (docs/semantics.md sections 1-3).
// One plain struct per family, filled by the caller; strides are in ELEMENTS,
// never bytes, and the last dim of every tensor is contiguous. Engine::forward*
// validates a struct before any backend sees it (kernels/src/validate_params.cpp).
//
// Conventions shared by all families:
//  - LSE is the natural-log sum-exp of the (scaled, soft-capped) scores over the
//    visible keys, fp32.
//  - A query row that sees no key gets output 0 and LSE -inf.
//  - Mask (docs/semantics.md section 1), anchored bottom-right unless `mask_shift` says
//    otherwise: with shift = s_k - s_q (per batch element),
//      row i sees key j  iff  0 <= j < s_k
//                        and (w_right < 0 or j <= i + shift + w_right)
//                        and (w_left  < 0 or j >= i + shift - w_left)
//    `causal` forces w_right = 0 and keeps w_left (causal + window = local).
//    attention_chunk C > 0 (chunked local attention, FA3) adds: key j must lie in the
//    chunk of row i's diagonal key p = i + shift, i.e. floor(j / C) == floor(p / C)
//                        (C * floor(p / C) <= j < C * floor(p / C) + C).
//    With chunk positions (chunk_q_pos / chunk_k_pos, for blocks of a longer sequence)
//    the chunk rule reads floor(kpos(j) / C) == floor(qpos(i) / C) instead, with
//    qpos(i) = chunk_q_pos[b] + i * chunk_stride, kpos(j) = chunk_k_pos[b] + j * chunk_stride.
//  - softcap > 0: score = softcap * tanh(score / softcap), before masking.
//  - sinks (optional, [h] fp32): one attention-sink logit per query head. The output
//    row of head h is multiplied by exp(lse) / (exp(lse) + exp(sinks[h])) exactly
//    once, after every merge (split-KV, ring, distributed decode); the returned LSE
//    excludes the sink, so partial results merge exactly (apply_sinks in
//    merge_state.hpp). +inf gives output 0, -inf changes nothing.
//  - qv (optional, FA3): an extra query part [.., h, d_v] in q's dtype, scored against
//    the value rows: score = scale * (q . k + qv . v) before the soft cap and the mask;
//    the default scale is then 1/sqrt(d + d_v). Same query-row layout as q (and out).
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "ringattn/dtype.hpp"

namespace ringattn {

inline constexpr int kMaxHeadDim = 256;

// Mask / score options, shared by every family.
struct MaskParams {
  float scale = 0.0f;     // softmax scale; 0 = 1/sqrt(d) (1/sqrt(d + d_v) with qv)
  float softcap = 0.0f;   // 0 = off
  bool causal = false;    // bottom-right causal (sets w_right = 0)
  int window_left = -1;   // -1 = unbounded
  int window_right = -1;  // -1 = unbounded
  // Optional per-batch-element diagonal shift overriding the bottom-right anchor:
  // [b] int64; key j is "on the diagonal" of row i when j == i + mask_shift[b].
  // Used by ring attention, where a block's query and key positions are offsets
  // into a longer sequence. nullptr = bottom-right (shift = s_k - s_q).
  const std::int64_t* mask_shift = nullptr;
  // Chunked local attention (FA3 attention_chunk, Llama 4): 0 = off; C > 0 restricts row
  // i to the keys of the size-C chunk holding its diagonal key (rule above), combined
  // with causal / windows. Dense, varlen and KV cache; ring attention, distributed
  // decode and sessions pass it on through the chunk positions below.
  int attention_chunk = 0;
  // Optional global positions of the chunk rule, for a call whose rows and keys are a
  // block of a longer sequence (ring attention, sharded caches): [b] int64 each, set
  // together and only with attention_chunk > 0. Row i of batch element b sits at
  // chunk_q_pos[b] + i * chunk_stride, key j at chunk_k_pos[b] + j * chunk_stride, and
  // row i may see key j only if both positions lie in the same size-C chunk (C > 0
  // and |positions| < 2^60). The windows and causal keep their local rule (shift).
  // nullptr = row i at i + shift, key j at j, stride 1 (the rule above).
  const std::int64_t* chunk_q_pos = nullptr;
  const std::int64_t* chunk_k_pos = nullptr;
  int chunk_stride = 1;  // >= 1 (a striped ring block: every P-th token of the sequence)
  // Attention-sink logits [h] fp32 (gpt-oss; FA3 s_aux, FlashInfer sinks), nullable.
  // NaN is rejected; +inf zeroes the row, -inf is no sink.
  const float* sinks = nullptr;
};

// Checks the MaskParams fields of a call with `h` query heads (windows, softcap,
// scale, sinks, attention_chunk and its positions) and throws InvalidArgument naming
// the field and the value; with b >= 0 also the b chunk positions. Engine calls it
// for every family; ring attention and distributed decode call it too.
void validate_mask(const MaskParams& m, int h, int b = -1);

// Optional callback a kernel calls from the calling thread while it runs: between
// key tiles and between tasks, at most once per `interval_us`. Ring attention uses it
// to drive MPI transfers under the compute (Open MPI moves a large message only while
// both sides are inside MPI calls when no single-copy path exists). The callback must
// not throw; it runs on the thread that called the Engine entry point (OpenMP thread
// 0 of the kernel's parallel region), so MPI_THREAD_FUNNELED suffices.
struct ProgressHook {
  void (*fn)(void* ctx) = nullptr;  // nullptr = no callback
  void* ctx = nullptr;
  int interval_us = 100;
};

// fp8 e4m3 descale factors (FA3 q_descale / k_descale / v_descale; docs/semantics.md
// "fp8 e4m3 q/k/v"), used only when dtype == kFP8E4M3 (any of them set with another
// dtype is an InvalidArgument). Each is [b, h_k] fp32, nullable (= all 1.0), element
// (bi, g) at ptr[bi * *_batch_stride + g] (stride along h_k is 1; batch stride 0
// broadcasts one row to every sequence). bi is the batch element / varlen segment /
// KV-cache sequence. The values multiply the dequantised inputs:
//   score = scale * q_descale[bi, g] * k_descale[bi, g] * (q . k)   (then soft cap)
//   out   = v_descale[bi, g] * softmax(scores) V
// with g = query head / (h / h_k) the KV head; the LSE is that of these scores.
// Every value must be finite (NaN / inf are rejected).
struct Fp8Descale {
  const float* q = nullptr;                                                 // [b, h_k] nullable
  const float* k = nullptr;                                                 // [b, h_k] nullable
  const float* v = nullptr;                                                 // [b, h_k] nullable
  std::int64_t q_batch_stride = 0, k_batch_stride = 0, v_batch_stride = 0;  // elements

  bool any() const { return q != nullptr || k != nullptr || v != nullptr; }
};

// Dense and varlen forward (FA3 flash_attn_func / flash_attn_varlen_func).
//
// Dense   (cu_seqlens_q == nullptr):
//   q   [b, s_q, h,   d]     k [b, s_k, h_k, d]     v [b, s_k, h_k, d_v]
//   out [b, s_q, h,   d_v]   lse [b, h, s_q]
// Varlen  (cu_seqlens_q and cu_seqlens_k set; batch strides ignored):
//   q   [total_q, h,   d]    k [total_k, h_k, d]    v [total_k, h_k, d_v]
//   out [total_q, h,   d_v]  lse [h, total_q]       total_q = cu_seqlens_q[b]
//   s_q / s_k hold max_seqlen_q / max_seqlen_k (upper bounds, used for planning).
struct FwdParams {
  DType dtype = DType::kF32;      // storage of q, k, v (kFP8E4M3: all three e4m3)
  DType out_dtype = DType::kF32;  // storage of out: kF32 or == dtype (fp8: kF32 or kBF16)

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // nullable; layout above

  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  int b = 0;    // batch size (number of sequences for varlen)
  int s_q = 0;  // query length (varlen: max_seqlen_q)
  int s_k = 0;  // key length   (varlen: max_seqlen_k)
  int h = 0;    // query heads
  int h_k = 0;  // key/value heads, h % h_k == 0 (GQA; MQA is h_k = 1)
  int d = 0;    // q/k head dim, <= 256
  int d_v = 0;  // v head dim, <= 256

  const std::int32_t* cu_seqlens_q = nullptr;  // [b+1] varlen only
  const std::int32_t* cu_seqlens_k = nullptr;  // [b+1] varlen only
  const std::int32_t* seqused_q = nullptr;     // [b] optional: rows used per segment
  const std::int32_t* seqused_k = nullptr;     // [b] optional: keys used per segment

  MaskParams mask;

  // Split-KV: 0 = let the engine decide, 1 = no split, n > 1 = n key splits.
  // Changes speed only, never results beyond rounding.
  int num_splits = 0;

  ProgressHook progress;  // optional, see ProgressHook

  // ---- fp8 e4m3 storage (dtype == kFP8E4M3 only) ----
  Fp8Descale descale;  // q/k/v descales [b, h_k], see Fp8Descale
  // ---- qv (FA3): extra query part scored against V (conventions above) ----
  //   qv dense [b, s_q, h, d_v], varlen [total_q, h, d_v]; storage `dtype` (as q).
  //   nullptr = off. Batch stride ignored for varlen.
  const void* qv = nullptr;
  std::int64_t qv_batch_stride = 0, qv_row_stride = 0, qv_head_stride = 0;

  bool is_varlen() const { return cu_seqlens_q != nullptr; }
};

// A plan from Engine::plan_kvcache (FA3 get_scheduler_metadata): how many key
// splits each sequence gets. Affects speed only.
struct SchedulerMetadata {
  int b = 0;
  int threads = 1;
  std::vector<std::int32_t> num_splits;  // [b] key splits per sequence (>= 1)
};

// KV-cache forward (FA3 flash_attn_with_kvcache).
//   q           [b, s_q, h, d]
//   k_cache     dense [b_cache, s_cache, h_k, d]   or paged [num_blocks, page_size, h_k, d]
//   v_cache     dense [b_cache, s_cache, h_k, d_v] or paged [num_blocks, page_size, h_k, d_v]
//   page_table  [b, max_pages] int32 (paged only); token t of sequence b lives at
//               cache[page_table[b, t / page_size], t % page_size]
//   k_new/v_new [b, s_new, h_k, d / d_v] appended IN PLACE at [cache_seqlens, +s_new)
//   out         [b, s_q, h, d_v], lse [b, h, s_q]
// Variable query lengths (cu_seqlens_q set; chunked prefill, each sequence its own
// number of rows): q [total_q, h, d], out [total_q, h, d_v], lse [h, total_q].
// Variable new-key counts (cu_seqlens_k_new set): k_new/v_new [total_new, h_k, d / d_v].
// Effective key count of sequence i: cache_seqlens[i] - leftpad[i] + s_new_i.
// Cache slots outside [leftpad, cache_seqlens + s_new) are never read (may be NaN).
struct KvCacheParams {
  DType dtype = DType::kF32;      // storage of q, caches, k_new, v_new (kFP8E4M3: all e4m3)
  DType out_dtype = DType::kF32;  // kF32 or == dtype (fp8: kF32 or kBF16)

  const void* q = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k_new = nullptr;  // nullable
  const void* v_new = nullptr;  // nullable (set together with k_new)
  void* out = nullptr;
  float* lse = nullptr;  // nullable

  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  // Dense cache: batch = cache sequence; paged cache: batch = block.
  std::int64_t k_cache_batch_stride = 0, k_cache_row_stride = 0, k_cache_head_stride = 0;
  std::int64_t v_cache_batch_stride = 0, v_cache_row_stride = 0, v_cache_head_stride = 0;
  std::int64_t k_new_batch_stride = 0, k_new_row_stride = 0, k_new_head_stride = 0;
  std::int64_t v_new_batch_stride = 0, v_new_row_stride = 0, v_new_head_stride = 0;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  int b = 0, s_q = 0, h = 0, h_k = 0, d = 0, d_v = 0;
  int s_new = 0;  // rows of k_new / v_new (0 = no append)

  // Dense cache geometry (page_table == nullptr).
  int b_cache = 0;  // number of cache sequences (>= max cache_batch_idx + 1)
  int s_cache = 0;  // capacity in tokens per cache sequence

  // Paged cache geometry.
  const std::int32_t* page_table = nullptr;  // [b, max_pages]
  std::int64_t page_table_batch_stride = 0;  // elements, usually max_pages
  int num_blocks = 0;
  int page_size = 0;
  int max_pages = 0;

  const std::int32_t* cache_seqlens = nullptr;    // [b] required: valid length before append
  const std::int32_t* cache_batch_idx = nullptr;  // [b] optional (dense cache): row of the cache
  const std::int32_t* cache_leftpad = nullptr;    // [b] optional: first valid token

  // FA3 cu_seqlens_q / max_seqlen_q: sequence i owns query rows [cu_seqlens_q[i],
  // cu_seqlens_q[i+1]) of q / out (batch strides ignored); s_q holds max_seqlen_q.
  const std::int32_t* cu_seqlens_q = nullptr;  // [b+1] nullable
  // FA3 cu_seqlens_k_new: sequence i appends rows [cu_seqlens_k_new[i], cu_seqlens_k_new[i+1])
  // of k_new / v_new (batch strides ignored); s_new holds the largest count.
  const std::int32_t* cu_seqlens_k_new = nullptr;  // [b+1] nullable

  // Rotary embedding (applied to q and k_new when rotary_cos != nullptr):
  //   cos/sin [s_rotary, rotary_dim / 2] fp32; rotary_dim even, <= d.
  //   interleaved: pairs (x[2i], x[2i+1]); otherwise half-split (x[i], x[i + rotary_dim/2]).
  //   k_new row r of sequence i is rotated at position cache_seqlens[i] + r (the
  //   absolute cache slot, leftpad or not); q row r at the same position when causal
  //   or windowed, else all q rows at position cache_seqlens[i] (FA semantics).
  const float* rotary_cos = nullptr;
  const float* rotary_sin = nullptr;
  int rotary_dim = 0;
  int s_rotary = 0;
  bool rotary_interleaved = false;
  // FA3 rotary_seqlens [b] (optional): rotary position of sequence i's first new row,
  // replacing cache_seqlens[i] in the positions above (k_new row r at rotary_seqlens[i] + r).
  const std::int32_t* rotary_seqlens = nullptr;

  MaskParams mask;

  int num_splits = 0;                       // 0 = engine decides (or plan), 1 = none
  const SchedulerMetadata* plan = nullptr;  // optional plan from Engine::plan_kvcache

  // ---- fp8 e4m3 storage (dtype == kFP8E4M3 only; rotary is rejected with fp8) ----
  Fp8Descale descale;  // q/k/v descales [b, h_k], see Fp8Descale
  // ---- qv (FA3): extra query part scored against V (conventions above) ----
  //   qv [b, s_q, h, d_v], or [total_q, h, d_v] with cu_seqlens_q (batch stride
  //   ignored); storage `dtype` (as q); never rotated. nullptr = off.
  const void* qv = nullptr;
  std::int64_t qv_batch_stride = 0, qv_row_stride = 0, qv_head_stride = 0;

  bool is_paged() const { return page_table != nullptr; }
};

}  // namespace ringattn
