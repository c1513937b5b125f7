// Strides of contiguous tensors, filled in one place (FA3's set_params_fprop idea)
// instead of twelve assignments at every call site. Strides are in ELEMENTS.
//
// set_contiguous_strides(FwdParams&) reads the shape fields (b, s_q, s_k, h, h_k,
// d, d_v; set them first) and sets all 12 strides for
//   dense  (cu_seqlens_q == nullptr):
//     q [b, s_q, h, d]   k [b, s_k, h_k, d]   v [b, s_k, h_k, d_v]   out [b, s_q, h, d_v]
//   varlen (cu_seqlens_q set; batch strides 0, s_q / s_k are only upper bounds):
//     q [total_q, h, d]  k [total_k, h_k, d]  v [total_k, h_k, d_v]  out [total_q, h, d_v]
//   and qv with out's shape (used only when p.qv is set).
//
// set_contiguous_strides(KvCacheParams&) reads b, s_q, h, h_k, d, d_v, s_new and the
// cache geometry (s_cache for a dense cache, page_size for a paged one) and sets
//   q [b, s_q, h, d]   out [b, s_q, h, d_v]   qv [b, s_q, h, d_v] (when p.qv is set)
//   k_cache / v_cache  dense [b_cache, s_cache, h_k, d / d_v]
//                      paged [num_blocks, page_size, h_k, d / d_v]
//   k_new / v_new      [b, s_new, h_k, d / d_v]
//   page_table         [b, max_pages] (page_table_batch_stride = max_pages)
// Pointers, dtypes, mask and everything else stay as the caller set them.
#pragma once

#include <cstdint>

#include "ringattn/attention_params.hpp"

namespace ringattn {

inline void set_contiguous_strides(FwdParams& p) {
  const bool varlen = p.is_varlen();
  const std::int64_t h = p.h, h_k = p.h_k, d = p.d, d_v = p.d_v;
  p.q_head_stride = d;
  p.q_row_stride = h * d;
  p.q_batch_stride = varlen ? 0 : std::int64_t{p.s_q} * h * d;
  p.k_head_stride = d;
  p.k_row_stride = h_k * d;
  p.k_batch_stride = varlen ? 0 : std::int64_t{p.s_k} * h_k * d;
  p.v_head_stride = d_v;
  p.v_row_stride = h_k * d_v;
  p.v_batch_stride = varlen ? 0 : std::int64_t{p.s_k} * h_k * d_v;
  p.out_head_stride = d_v;
  p.out_row_stride = h * d_v;
  p.out_batch_stride = varlen ? 0 : std::int64_t{p.s_q} * h * d_v;
  p.qv_head_stride = d_v;  // qv has out's shape
  p.qv_row_stride = h * d_v;
  p.qv_batch_stride = p.out_batch_stride;
}

inline void set_contiguous_strides(KvCacheParams& p) {
  const std::int64_t h = p.h, h_k = p.h_k, d = p.d, d_v = p.d_v;
  const std::int64_t cache_rows = p.is_paged() ? p.page_size : p.s_cache;
  p.q_head_stride = d;
  p.q_row_stride = h * d;
  p.q_batch_stride = std::int64_t{p.s_q} * h * d;
  p.k_cache_head_stride = d;
  p.k_cache_row_stride = h_k * d;
  p.k_cache_batch_stride = cache_rows * h_k * d;
  p.v_cache_head_stride = d_v;
  p.v_cache_row_stride = h_k * d_v;
  p.v_cache_batch_stride = cache_rows * h_k * d_v;
  p.k_new_head_stride = d;
  p.k_new_row_stride = h_k * d;
  p.k_new_batch_stride = std::int64_t{p.s_new} * h_k * d;
  p.v_new_head_stride = d_v;
  p.v_new_row_stride = h_k * d_v;
  p.v_new_batch_stride = std::int64_t{p.s_new} * h_k * d_v;
  p.out_head_stride = d_v;
  p.out_row_stride = h * d_v;
  p.out_batch_stride = std::int64_t{p.s_q} * h * d_v;
  p.qv_head_stride = d_v;  // qv has out's shape
  p.qv_row_stride = h * d_v;
  p.qv_batch_stride = p.out_batch_stride;
  if (p.is_paged()) p.page_table_batch_stride = p.max_pages;
}

}  // namespace ringattn
