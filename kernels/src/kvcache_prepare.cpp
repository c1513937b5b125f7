// KV-cache append and rotary (see kvcache_prepare.hpp for the position rules).
#include "kvcache_prepare.hpp"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ringattn/dtype.hpp"

namespace ringattn::detail {

namespace {

char* byte_ptr(void* base, std::int64_t elem_off, DType t) {
  return static_cast<char*>(base) + elem_off * static_cast<std::int64_t>(dtype_size(t));
}
const char* byte_ptr(const void* base, std::int64_t elem_off, DType t) {
  return static_cast<const char*>(base) + elem_off * static_cast<std::int64_t>(dtype_size(t));
}

// Copies one row of `n` elements, rotating the first rotary_dim values at `pos`
// when rotate is set. Values outside the rotary span are copied bit-exactly.
void copy_row(const void* src, DType src_t, void* dst, DType dst_t, int n, bool rotate,
              const KvCacheParams& p, std::int64_t pos, std::vector<float>& tmp) {
  if (!rotate && src_t == dst_t) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * dtype_size(src_t));
    return;
  }
  tmp.resize(static_cast<std::size_t>(n));
  for (int c = 0; c < n; ++c) tmp[static_cast<std::size_t>(c)] = load_as_f32(src, c, src_t);
  if (rotate) rotary_apply_f32(tmp.data(), p, pos);
  const int first_plain = rotate ? p.rotary_dim : 0;
  for (int c = 0; c < first_plain; ++c)
    store_from_f32(dst, c, dst_t, tmp[static_cast<std::size_t>(c)]);
  if (src_t == dst_t) {
    std::memcpy(byte_ptr(dst, first_plain, dst_t), byte_ptr(src, first_plain, src_t),
                static_cast<std::size_t>(n - first_plain) * dtype_size(src_t));
  } else {
    for (int c = first_plain; c < n; ++c)
      store_from_f32(dst, c, dst_t, tmp[static_cast<std::size_t>(c)]);
  }
}

}  // namespace

void rotary_apply_f32(float* x, const KvCacheParams& p, std::int64_t pos) {
  const int half = p.rotary_dim / 2;
  const float* cos_row = p.rotary_cos + pos * half;
  const float* sin_row = p.rotary_sin + pos * half;
  // Pair m couples (x[2m], x[2m+1]) when interleaved (GPT-J), else (x[m], x[m+half]) (GPT-NeoX).
  for (int m = 0; m < half; ++m) {
    const int i0 = p.rotary_interleaved ? 2 * m : m;
    const int i1 = p.rotary_interleaved ? 2 * m + 1 : m + half;
    const float x0 = x[i0];
    const float x1 = x[i1];
    x[i0] = x0 * cos_row[m] - x1 * sin_row[m];
    x[i1] = x0 * sin_row[m] + x1 * cos_row[m];
  }
}

int kv_seq_of_row(const KvCacheParams& p, std::int64_t g) {
  if (!p.cu_seqlens_q) return static_cast<int>(g / p.s_q);
  return static_cast<int>(std::upper_bound(p.cu_seqlens_q, p.cu_seqlens_q + p.b + 1, g) -
                          p.cu_seqlens_q - 1);
}

void kvcache_append(const KvCacheParams& p, int threads) {
  if (p.k_new == nullptr || p.s_new == 0) return;
  const bool rotate = kv_has_rotary(p);
  const std::int64_t work = std::int64_t{p.b} * p.s_new * p.h_k;
  // One item per (sequence, new row, KV head); each writes a distinct cache row
  // (validation guarantees slots of different sequences do not collide).
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp;
#pragma omp for schedule(static)
    for (std::int64_t w = 0; w < work; ++w) {
      const int hk = static_cast<int>(w % p.h_k);
      const std::int64_t r = (w / p.h_k) % p.s_new;
      const int i = static_cast<int>(w / (std::int64_t{p.h_k} * p.s_new));
      if (r >= kv_s_new(p, i)) continue;  // cu_seqlens_k_new: this sequence has fewer rows
      // Key index counted from the leftpad (what kv_k_offset takes) and the rotary
      // position, which is the absolute cache slot (FA semantics).
      const std::int64_t t = std::int64_t{p.cache_seqlens[i]} - kv_leftpad(p, i) + r;
      const std::int64_t pos = kv_rotary_pos_k(p, i, r);
      const std::int64_t k_src = kv_k_new_offset(p, i, r) + hk * p.k_new_head_stride;
      const std::int64_t v_src = kv_v_new_offset(p, i, r) + hk * p.v_new_head_stride;
      copy_row(byte_ptr(p.k_new, k_src, p.dtype), p.dtype,
               byte_ptr(p.k_cache, kv_k_offset(p, i, t, hk), p.dtype), p.dtype, p.d, rotate, p, pos,
               tmp);
      copy_row(byte_ptr(p.v_new, v_src, p.dtype), p.dtype,
               byte_ptr(p.v_cache, kv_v_offset(p, i, t, hk), p.dtype), p.dtype, p.d_v, false, p, 0,
               tmp);
    }
  }
}

void kvcache_prepare_q(const KvCacheParams& p, void* q_out, DType out_dtype, int threads) {
  const bool rotate = kv_has_rotary(p);
  const std::int64_t work = kv_total_q(p) * p.h;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> tmp;
#pragma omp for schedule(static)
    for (std::int64_t w = 0; w < work; ++w) {
      // w enumerates [total_q, h] in the scratch's own (contiguous) order.
      const int hi = static_cast<int>(w % p.h);
      const std::int64_t g = w / p.h;
      const int i = kv_seq_of_row(p, g);
      const std::int64_t r = g - kv_q_row0(p, i);
      const std::int64_t src = kv_q_offset(p, i, r) + hi * p.q_head_stride;
      copy_row(byte_ptr(p.q, src, p.dtype), p.dtype, byte_ptr(q_out, w * p.d, out_dtype), out_dtype,
               p.d, rotate, p, rotate ? kv_rotary_pos_q(p, i, r) : 0, tmp);
    }
  }
}

}  // namespace ringattn::detail
