// Building blocks of the reference backend: the mask rule of docs/semantics.md section 1
// written down literally, and one query row attending to a range of keys with
// plain loops (fp32 accumulation, two passes: scores and max, then the weighted sum).
// Everything here favours being obviously correct over being fast.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "ringattn/attention_params.hpp"
#include "ringattn/dtype.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail {

// a / b rounded towards -inf (b > 0): the chunk index of a position.
inline std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Mask of one batch element (docs/semantics.md section 1, attention_params.hpp):
//   row i sees key j  iff  0 <= j < s_k
//                     and (w_right < 0 or j <= i + shift + w_right)
//                     and (w_left  < 0 or j >= i + shift - w_left)
//                     and (chunk == 0 or floor(kpos(j) / chunk) == floor(qpos(i) / chunk))
// with qpos(i) = q_pos + i * pos_stride, kpos(j) = k_pos + j * pos_stride (MaskParams
// chunk positions; by default q_pos = shift, k_pos = 0, stride 1).
struct RowMask {
  std::int64_t s_k = 0;
  std::int64_t shift = 0;  // s_k - s_q (bottom-right) unless MaskParams::mask_shift overrides
  int w_left = -1;
  int w_right = -1;
  int chunk = 0;                                      // attention_chunk, 0 = off
  std::int64_t q_pos = 0, k_pos = 0, pos_stride = 1;  // chunk-rule positions

  static RowMask make(const MaskParams& m, int batch, std::int64_t s_q, std::int64_t s_k) {
    RowMask r;
    r.s_k = s_k;
    r.shift = m.mask_shift ? m.mask_shift[batch] : s_k - s_q;
    r.w_left = m.window_left;
    r.w_right = m.causal ? 0 : m.window_right;
    r.chunk = m.attention_chunk;
    r.q_pos = m.chunk_q_pos ? m.chunk_q_pos[batch] : r.shift;
    r.k_pos = m.chunk_k_pos ? m.chunk_k_pos[batch] : 0;
    r.pos_stride = m.chunk_stride;
    return r;
  }

  bool sees(std::int64_t i, std::int64_t j) const {
    if (j < 0 || j >= s_k) return false;
    if (w_right >= 0 && j > i + shift + w_right) return false;
    if (w_left >= 0 && j < i + shift - w_left) return false;
    if (chunk > 0 &&
        floor_div(k_pos + j * pos_stride, chunk) != floor_div(q_pos + i * pos_stride, chunk))
      return false;
    return true;
  }
};

// Score transform: scale, then the optional soft cap (before masking).
struct ScoreFn {
  float scale = 1.0f;
  float softcap = 0.0f;

  // d_score: the length of the score's dot product, d (or d + d_v with qv).
  static ScoreFn make(const MaskParams& m, int d_score) {
    ScoreFn f;
    f.scale = m.scale != 0.0f ? m.scale : 1.0f / std::sqrt(static_cast<float>(d_score));
    f.softcap = m.softcap;
    return f;
  }

  float operator()(float dot) const {
    const float s = scale * dot;
    return softcap > 0.0f ? softcap * std::tanh(s / softcap) : s;
  }
};

// Per-thread scratch of the reference loops.
struct RowScratch {
  std::vector<float> q;          // [d] query row in fp32
  std::vector<float> qv;         // [d_v] qv row in fp32 (calls with qv)
  std::vector<float> scores;     // [s_k]
  std::vector<float> o;          // [d_v] output of the row
  std::vector<float> o_parts;    // [num_splits, d_v]
  std::vector<float> lse_parts;  // [num_splits]
  std::vector<float> row;        // [max(d, d_v)] converted K or V row
};

// Row of n values of storage type t as fp32: the row itself for fp32, else a
// converted copy in `buf`.
inline const float* row_as_f32(const void* row, int n, DType t, std::vector<float>& buf) {
  if (t == DType::kF32) return static_cast<const float*>(row);
  buf.resize(static_cast<std::size_t>(n));
  const auto* bits = static_cast<const std::uint16_t*>(row);
  if (t == DType::kBF16) {
    for (int c = 0; c < n; ++c) buf[static_cast<std::size_t>(c)] = bf16_to_f32(bits[c]);
  } else if (t == DType::kF16) {
    for (int c = 0; c < n; ++c) buf[static_cast<std::size_t>(c)] = f16_to_f32(bits[c]);
  } else {
    for (int c = 0; c < n; ++c) buf[static_cast<std::size_t>(c)] = load_as_f32(row, c, t);
  }
  return buf.data();
}

// q . k in fp32 with 8 interleaved partial sums (n is a multiple of 8): the same
// accuracy class as one running sum, but independent chains the compiler can
// vectorise, which keeps the reference fast enough for the test grids.
inline float dot_f32(const float* a, const float* b, int n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int c = 0; c < n; c += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[c + l] * b[c + l];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// Query row `q` (fp32, [d], d a multiple of 8) of row index i attends to keys j in
// [j0, j1) that the mask shows. k_row(j) / v_row(j) return the element pointer
// (storage dtype `dtype`) of key j's row. `qv` (fp32 [d_v], nullable): the FA3 extra
// query part, whose dot product with key j's value row adds to the score. Writes the
// normalised output to o[0, d_v) and returns the natural-log sum-exp of the visible
// scores (-inf with o = 0 when no key is visible).
template <class KRow, class VRow>
float attend_row_range(const float* q, const float* qv, int d, int d_v, DType dtype, std::int64_t i,
                       std::int64_t j0, std::int64_t j1, const RowMask& mask, const ScoreFn& score,
                       KRow&& k_row, VRow&& v_row, RowScratch& scratch, float* o) {
  for (int c = 0; c < d_v; ++c) o[c] = 0.0f;
  if (j1 <= j0) return kNegInf;
  std::vector<float>& scores = scratch.scores;
  scores.resize(static_cast<std::size_t>(j1 - j0));
  // Pass 1: scores of the visible keys and their maximum.
  SoftmaxState st;
  for (std::int64_t j = j0; j < j1; ++j) {
    float s = kNegInf;
    if (mask.sees(i, j)) {
      float dot = dot_f32(q, row_as_f32(k_row(j), d, dtype, scratch.row), d);
      if (qv) dot += dot_f32(qv, row_as_f32(v_row(j), d_v, dtype, scratch.row), d_v);
      s = score(dot);
      if (s > st.m) st.m = s;
    }
    scores[static_cast<std::size_t>(j - j0)] = s;
  }
  if (st.m == kNegInf) return kNegInf;
  // Pass 2: p_j = exp(s_j - m), d = sum p_j, o = sum p_j v_j / d.
  for (std::int64_t j = j0; j < j1; ++j) {
    const float s = scores[static_cast<std::size_t>(j - j0)];
    if (s == kNegInf) continue;
    const float p = std::exp(s - st.m);
    st.d += p;
    const float* v = row_as_f32(v_row(j), d_v, dtype, scratch.row);
    for (int c = 0; c < d_v; ++c) o[c] += p * v[c];
  }
  const float inv = st.inv_sum();
  for (int c = 0; c < d_v; ++c) o[c] *= inv;
  return st.lse();
}

// The same row over keys [0, s_k) cut into `num_splits` contiguous chunks, each
// computed as its own partial (o, lse) and combined by merge_states: exactly how an
// optimised split-KV kernel combines its splits, so split on/off is testable here.
template <class KRow, class VRow>
float attend_row(const float* q, const float* qv, int d, int d_v, DType dtype, std::int64_t i,
                 const RowMask& mask, const ScoreFn& score, int num_splits, KRow&& k_row,
                 VRow&& v_row, RowScratch& scratch) {
  scratch.o.resize(static_cast<std::size_t>(d_v));
  if (num_splits <= 1) {
    return attend_row_range(q, qv, d, d_v, dtype, i, 0, mask.s_k, mask, score, k_row, v_row,
                            scratch, scratch.o.data());
  }
  scratch.o_parts.resize(static_cast<std::size_t>(num_splits) * static_cast<std::size_t>(d_v));
  scratch.lse_parts.resize(static_cast<std::size_t>(num_splits));
  for (int t = 0; t < num_splits; ++t) {
    const std::int64_t j0 = mask.s_k * t / num_splits;
    const std::int64_t j1 = mask.s_k * (t + 1) / num_splits;
    scratch.lse_parts[static_cast<std::size_t>(t)] =
        attend_row_range(q, qv, d, d_v, dtype, i, j0, j1, mask, score, k_row, v_row, scratch,
                         scratch.o_parts.data() + static_cast<std::int64_t>(t) * d_v);
  }
  float lse = 0.0f;
  merge_states(scratch.o_parts.data(), scratch.lse_parts.data(), scratch.o.data(), &lse, 1,
               num_splits, d_v);
  return lse;
}

// fp8 descales (Fp8Descale) of batch element bi, KV head g: `qk` multiplies the query
// row (q_descale * k_descale), `v` the output row. 1 when unset.
struct RowDescale {
  float qk = 1.0f, v = 1.0f;
  static RowDescale make(const Fp8Descale& ds, int bi, int g) {
    const auto at = [&](const float* x, std::int64_t stride) {
      return x ? x[bi * stride + g] : 1.0f;
    };
    return {at(ds.q, ds.q_batch_stride) * at(ds.k, ds.k_batch_stride), at(ds.v, ds.v_batch_stride)};
  }
};

// Writes an output row [d_v] in `out_dtype` at element offset `off` of `out`.
inline void store_row(void* out, std::int64_t off, DType out_dtype, const float* o, int d_v) {
  for (int c = 0; c < d_v; ++c) store_from_f32(out, off + c, out_dtype, o[c]);
}

// Element pointer into a tensor of storage type t.
inline const void* element_ptr(const void* base, std::int64_t off, DType t) {
  return static_cast<const char*>(base) + off * static_cast<std::int64_t>(dtype_size(t));
}

}  // namespace ringattn::detail
