// KV-cache preparation shared by every backend (docs/semantics.md section 3, FA3
// flash_attn_with_kvcache semantics): where a cached token lives (dense or paged),
// the in-place append of k_new / v_new (with rotary on k_new), and rotary on q.
// Backends call kvcache_append() once, then read keys through kv_k_offset() /
// kv_v_offset() so that page logic lives in exactly one place.
//
// Positions. For sequence i let lp = cache_leftpad[i] (0 when null) and
// c = cache_seqlens[i]. Keys are numbered t = 0 .. kv_num_keys(p, i) - 1 counted
// FROM THE LEFTPAD: key t is cache slot lp + t of that sequence, and
//   kv_num_keys = c - lp + s_new.
// New row r (0 <= r < s_new) is written to slot c + r, i.e. key t = c - lp + r.
// Slots before lp and from c + s_new on are never read (they may hold NaN).
//
// Rotary (when p.rotary_cos != nullptr), cos/sin [s_rotary, rotary_dim / 2] fp32.
// Positions are ABSOLUTE cache slots, as in FlashAttention (its tests rotate with
// seqlen_offsets = cache_seqlens whether or not cache_leftpad is set); with
// rotary_seqlens, c below is rotary_seqlens[i] instead of cache_seqlens[i]:
//   k_new row r is rotated at position c + r;
//   q row r at position c + r when the mask is causal, windowed or chunked, otherwise
//   every q row at position c (the whole query block sits at the end of the cache).
//   Pairing: interleaved (x[2m], x[2m+1]) or half-split (x[m], x[m + rotary_dim/2]);
//   (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). Dims >= rotary_dim are unchanged.
#pragma once

#include <cstdint>

#include "ringattn/attention_params.hpp"

namespace ringattn::detail {

// First valid slot of sequence i (0 without cache_leftpad).
inline std::int64_t kv_leftpad(const KvCacheParams& p, int i) {
  return p.cache_leftpad ? p.cache_leftpad[i] : 0;
}

// New rows sequence i appends: s_new, or its cu_seqlens_k_new segment.
inline std::int64_t kv_s_new(const KvCacheParams& p, int i) {
  return p.cu_seqlens_k_new ? std::int64_t{p.cu_seqlens_k_new[i + 1]} - p.cu_seqlens_k_new[i]
                            : p.s_new;
}

// Element offsets into k_new / v_new of new row r of sequence i, KV head 0.
inline std::int64_t kv_k_new_offset(const KvCacheParams& p, int i, std::int64_t r) {
  return p.cu_seqlens_k_new ? (p.cu_seqlens_k_new[i] + r) * p.k_new_row_stride
                            : i * p.k_new_batch_stride + r * p.k_new_row_stride;
}
inline std::int64_t kv_v_new_offset(const KvCacheParams& p, int i, std::int64_t r) {
  return p.cu_seqlens_k_new ? (p.cu_seqlens_k_new[i] + r) * p.v_new_row_stride
                            : i * p.v_new_batch_stride + r * p.v_new_row_stride;
}

// Query rows of sequence i (s_q, or its cu_seqlens_q segment), the index of its first
// row among all query rows ([b, s_q] flattened, or packed), and all query rows.
inline std::int64_t kv_s_q(const KvCacheParams& p, int i) {
  return p.cu_seqlens_q ? std::int64_t{p.cu_seqlens_q[i + 1]} - p.cu_seqlens_q[i] : p.s_q;
}
inline std::int64_t kv_q_row0(const KvCacheParams& p, int i) {
  return p.cu_seqlens_q ? std::int64_t{p.cu_seqlens_q[i]} : std::int64_t{i} * p.s_q;
}
inline std::int64_t kv_total_q(const KvCacheParams& p) {
  return p.cu_seqlens_q ? std::int64_t{p.cu_seqlens_q[p.b]} : std::int64_t{p.b} * p.s_q;
}
// Sequence of query row g (0 <= g < kv_total_q).
int kv_seq_of_row(const KvCacheParams& p, std::int64_t g);
// Element offsets into q / out of query row r of sequence i, head 0.
inline std::int64_t kv_q_offset(const KvCacheParams& p, int i, std::int64_t r) {
  return p.cu_seqlens_q ? (p.cu_seqlens_q[i] + r) * p.q_row_stride
                        : i * p.q_batch_stride + r * p.q_row_stride;
}
// Element offset into qv (FA3's extra query part, shaped as out) of row r of sequence i.
inline std::int64_t kv_qv_offset(const KvCacheParams& p, int i, std::int64_t r) {
  return p.cu_seqlens_q ? (p.cu_seqlens_q[i] + r) * p.qv_row_stride
                        : i * p.qv_batch_stride + r * p.qv_row_stride;
}
inline std::int64_t kv_out_offset(const KvCacheParams& p, int i, std::int64_t r) {
  return p.cu_seqlens_q ? (p.cu_seqlens_q[i] + r) * p.out_row_stride
                        : i * p.out_batch_stride + r * p.out_row_stride;
}
// Index into lse of query row r of sequence i, head hi: [b, h, s_q] or [h, total_q].
inline std::int64_t kv_lse_index(const KvCacheParams& p, int i, std::int64_t r, int hi) {
  return p.cu_seqlens_q ? hi * kv_total_q(p) + p.cu_seqlens_q[i] + r
                        : (std::int64_t{i} * p.h + hi) * p.s_q + r;
}

// Effective key count of sequence i: cache_seqlens[i] - leftpad[i] + s_new_i.
inline std::int64_t kv_num_keys(const KvCacheParams& p, int i) {
  return std::int64_t{p.cache_seqlens[i]} - kv_leftpad(p, i) + kv_s_new(p, i);
}

// Row of the dense cache (or of the page table) that sequence i uses.
inline std::int64_t kv_cache_row(const KvCacheParams& p, int i) {
  return p.cache_batch_idx ? p.cache_batch_idx[i] : i;
}

// Element offset, relative to the cache base, of slot `slot` (absolute, leftpad
// included) of sequence i, KV head 0, for a cache with the given batch/row strides.
inline std::int64_t kv_slot_offset(const KvCacheParams& p, int i, std::int64_t slot,
                                   std::int64_t batch_stride, std::int64_t row_stride) {
  if (p.page_table) {
    const std::int32_t* pt = p.page_table + kv_cache_row(p, i) * p.page_table_batch_stride;
    const std::int64_t block = pt[slot / p.page_size];
    return block * batch_stride + (slot % p.page_size) * row_stride;
  }
  return kv_cache_row(p, i) * batch_stride + slot * row_stride;
}

// Element offsets into k_cache / v_cache of key t (counted from the leftpad,
// 0 <= t < kv_num_keys(p, i)) of sequence i, KV head hk. Multiply by
// dtype_size(p.dtype) for bytes.
inline std::int64_t kv_k_offset(const KvCacheParams& p, int i, std::int64_t t, int hk) {
  return kv_slot_offset(p, i, kv_leftpad(p, i) + t, p.k_cache_batch_stride, p.k_cache_row_stride) +
         hk * p.k_cache_head_stride;
}
inline std::int64_t kv_v_offset(const KvCacheParams& p, int i, std::int64_t t, int hk) {
  return kv_slot_offset(p, i, kv_leftpad(p, i) + t, p.v_cache_batch_stride, p.v_cache_row_stride) +
         hk * p.v_cache_head_stride;
}

// Typed element pointers of the same rows (storage dtype p.dtype).
inline const void* kv_k_row(const KvCacheParams& p, int i, std::int64_t t, int hk) {
  return static_cast<const char*>(p.k_cache) +
         kv_k_offset(p, i, t, hk) * static_cast<std::int64_t>(dtype_size(p.dtype));
}
inline const void* kv_v_row(const KvCacheParams& p, int i, std::int64_t t, int hk) {
  return static_cast<const char*>(p.v_cache) +
         kv_v_offset(p, i, t, hk) * static_cast<std::int64_t>(dtype_size(p.dtype));
}

// True when rotary embedding applies (to q and, if present, to k_new).
inline bool kv_has_rotary(const KvCacheParams& p) { return p.rotary_cos != nullptr; }

// Rotary position of the first new row of sequence i: rotary_seqlens[i] when given (FA3),
// else cache_seqlens[i] (the absolute slot).
inline std::int64_t kv_rotary_base(const KvCacheParams& p, int i) {
  return p.rotary_seqlens ? p.rotary_seqlens[i] : p.cache_seqlens[i];
}

// Rotary position of k_new row r of sequence i: base + r.
inline std::int64_t kv_rotary_pos_k(const KvCacheParams& p, int i, std::int64_t r) {
  return kv_rotary_base(p, i) + r;
}

// Rotary position of q row r of sequence i (see the header comment).
inline std::int64_t kv_rotary_pos_q(const KvCacheParams& p, int i, std::int64_t r) {
  const bool per_row = p.mask.causal || p.mask.window_left >= 0 || p.mask.window_right >= 0 ||
                       p.mask.attention_chunk > 0;
  return kv_rotary_base(p, i) + (per_row ? r : 0);
}

// Rotates the first rotary_dim values of x [>= rotary_dim] fp32 in place at `pos`.
void rotary_apply_f32(float* x, const KvCacheParams& p, std::int64_t pos);

// Appends k_new / v_new (when set) into k_cache / v_cache in place at slots
// [cache_seqlens[i], cache_seqlens[i] + s_new) of each sequence, rotating k_new
// first when rotary applies. Without rotary (and always for v) the values are
// copied bit-exactly; rotated values are computed in fp32 and stored once in
// p.dtype. Call once per forward, before reading keys. Uses up to `threads` threads.
void kvcache_append(const KvCacheParams& p, int threads);

// Writes q, rotated when kv_has_rotary(p) (copied otherwise), into the contiguous
// scratch `q_out` [total_q, h, d] (= [b, s_q, h, d] without cu_seqlens_q) of type
// `out_dtype` (fp32 or p.dtype; with p.dtype and no rotary the copy is bit-exact). Query
// row g (kv_q_row0 + r) sits at g * h * d.
void kvcache_prepare_q(const KvCacheParams& p, void* q_out, DType out_dtype, int threads);

}  // namespace ringattn::detail
