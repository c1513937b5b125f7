// Float64 (and plain fp32) attention reference; see reference_f64.hpp.
//
// Every problem family is reduced to the same per-batch-element "segment": the
// query rows, the visible key/value rows (gathered from dense, varlen or cache
// storage and upcast), and the diagonal shift of the mask. One plain loop then
// computes softmax attention for each (row, head) over all keys, with no tiling
// and no online rescaling, so it shares no algorithm with the kernels under test.
#include "reference_f64.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ringattn/dtype.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::test {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// One independent attention problem (one batch element), values already in T.
template <typename T>
struct Segment {
  int s_q = 0;
  int s_k = 0;
  std::int64_t shift = 0;  // key j is on row i's diagonal when j == i + shift
  // attention_chunk positions: row i at q_pos + i * pos_stride, key j at k_pos + j * pos_stride.
  std::int64_t q_pos = 0, k_pos = 0, pos_stride = 1;
  std::vector<T> q;   // [s_q, h, d]
  std::vector<T> k;   // [s_k, h_k, d]
  std::vector<T> v;   // [s_k, h_k, d_v]
  std::vector<T> qv;  // [s_q, h, d_v] FA3 extra query part; empty = none
};

struct Dims {
  int h, h_k, d, d_v;
};

// docs/semantics.md section 1 mask, literally: row i sees key j iff 0 <= j < s_k and
// j <= i + shift + w_right (w_right >= 0) and j >= i + shift - w_left (w_left >= 0);
// causal forces w_right = 0.
template <typename T>
bool visible(std::int64_t i, std::int64_t j, const Segment<T>& seg, const MaskParams& m) {
  const int w_right = m.causal ? 0 : m.window_right;
  const int w_left = m.window_left;
  const std::int64_t shift = seg.shift;
  if (j < 0 || j >= seg.s_k) return false;
  if (w_right >= 0 && j > i + shift + w_right) return false;
  if (w_left >= 0 && j < i + shift - w_left) return false;
  if (m.attention_chunk > 0) {
    // Chunked local attention: the positions of key j and row i in the same chunk
    // (by default the row's position is its diagonal key i + shift, key j's is j).
    const double c = m.attention_chunk;
    const double qp = static_cast<double>(seg.q_pos + i * seg.pos_stride);
    const double kp = static_cast<double>(seg.k_pos + j * seg.pos_stride);
    if (std::floor(kp / c) != std::floor(qp / c)) return false;
  }
  return true;
}

// Fills the segment's chunk-rule positions from the mask (after seg.shift is set).
template <typename T>
void set_chunk_positions(Segment<T>& seg, const MaskParams& m, int bi) {
  seg.q_pos = m.chunk_q_pos ? m.chunk_q_pos[bi] : seg.shift;
  seg.k_pos = m.chunk_k_pos ? m.chunk_k_pos[bi] : 0;
  seg.pos_stride = m.chunk_stride;
}

float round_to(DType t, float x) {
  unsigned char buf[4];
  store_from_f32(buf, 0, t, x);
  return load_as_f32(buf, 0, t);
}

// Plain softmax attention of one segment: for every (row i, head hh), scores over
// all visible keys of KV head hh / (h / h_k), then out = sum p_j v_j / sum p_j and
// lse = log(sum exp(score_j)) (natural log). Empty rows: out 0, lse -inf.
//   out [s_q, h, d_v], lse [h, s_q]
template <typename T>
void attend(const Segment<T>& seg, const Dims& dm, const MaskParams& mask, std::vector<T>& out,
            std::vector<T>& lse) {
  // score = scale * (q . k + qv . v); the default scale counts the qv dims too.
  const bool has_qv = !seg.qv.empty();
  const int d_score = has_qv ? dm.d + dm.d_v : dm.d;
  const T scale = mask.scale != 0.0f ? static_cast<T>(mask.scale)
                                     : static_cast<T>(1) / std::sqrt(static_cast<T>(d_score));
  const T softcap = static_cast<T>(mask.softcap);
  const int group = dm.h / dm.h_k;
  out.assign(static_cast<std::size_t>(seg.s_q) * dm.h * dm.d_v, T(0));
  lse.assign(static_cast<std::size_t>(dm.h) * seg.s_q, T(0));
  std::vector<T> scores(static_cast<std::size_t>(seg.s_k));
  std::vector<char> vis(static_cast<std::size_t>(seg.s_k));
  for (int i = 0; i < seg.s_q; ++i) {
    for (int hh = 0; hh < dm.h; ++hh) {
      const int kh = hh / group;
      const T* qrow = &seg.q[(static_cast<std::size_t>(i) * dm.h + hh) * dm.d];
      T m = -std::numeric_limits<T>::infinity();
      bool any = false;
      for (int j = 0; j < seg.s_k; ++j) {
        vis[j] = visible(i, j, seg, mask);
        if (!vis[j]) continue;
        const T* krow = &seg.k[(static_cast<std::size_t>(j) * dm.h_k + kh) * dm.d];
        T dot = 0;
        for (int c = 0; c < dm.d; ++c) dot += qrow[c] * krow[c];
        if (has_qv) {
          const T* qvrow = &seg.qv[(static_cast<std::size_t>(i) * dm.h + hh) * dm.d_v];
          const T* vrow = &seg.v[(static_cast<std::size_t>(j) * dm.h_k + kh) * dm.d_v];
          for (int c = 0; c < dm.d_v; ++c) dot += qvrow[c] * vrow[c];
        }
        T s = scale * dot;
        if (softcap > 0) s = softcap * std::tanh(s / softcap);
        scores[j] = s;
        if (!any || s > m) m = s;
        any = true;
      }
      T* orow = &out[(static_cast<std::size_t>(i) * dm.h + hh) * dm.d_v];
      T& l = lse[static_cast<std::size_t>(hh) * seg.s_q + i];
      if (!any) {
        l = -std::numeric_limits<T>::infinity();
        continue;
      }
      T sum = 0;
      for (int j = 0; j < seg.s_k; ++j) {
        if (!vis[j]) continue;
        const T pj = std::exp(scores[j] - m);
        sum += pj;
        const T* vrow = &seg.v[(static_cast<std::size_t>(j) * dm.h_k + kh) * dm.d_v];
        for (int c = 0; c < dm.d_v; ++c) orow[c] += pj * vrow[c];
      }
      // Attention sink: one extra logit in the softmax denominator that carries no
      // value, out = sum p_j v_j / (sum p_j + exp(sink - m)); lse excludes it.
      T denom = sum;
      if (mask.sinks) denom += std::exp(static_cast<T>(mask.sinks[hh]) - m);
      for (int c = 0; c < dm.d_v; ++c) orow[c] /= denom;
      l = m + std::log(sum);
    }
  }
}

// Loads `n` contiguous elements at element offset `off` of a `t` tensor into dst.
template <typename T>
void load_row(const void* base, std::int64_t off, DType t, int n, T* dst) {
  for (int c = 0; c < n; ++c) dst[c] = static_cast<T>(load_as_f32(base, off + c, t));
}

// fp8 descales (Fp8Descale, docs/semantics.md "fp8 e4m3 q/k/v"), literally: the
// dequantised values of batch element bi times their [b, h_k] factor; query head hh
// uses the factor of its KV head hh / (h / h_k). Unset factors are 1.
template <typename T>
void apply_descale(Segment<T>& seg, const Dims& dm, const Fp8Descale& ds, int bi) {
  const auto f = [&](const float* x, std::int64_t stride, int g) {
    return x ? static_cast<T>(x[bi * stride + g]) : T(1);
  };
  const int group = dm.h / dm.h_k;
  for (int i = 0; i < seg.s_q; ++i)
    for (int hh = 0; hh < dm.h; ++hh)
      for (int c = 0; c < dm.d; ++c)
        seg.q[(static_cast<std::size_t>(i) * dm.h + hh) * dm.d + c] *=
            f(ds.q, ds.q_batch_stride, hh / group);
  for (int j = 0; j < seg.s_k; ++j)
    for (int kh = 0; kh < dm.h_k; ++kh) {
      for (int c = 0; c < dm.d; ++c)
        seg.k[(static_cast<std::size_t>(j) * dm.h_k + kh) * dm.d + c] *=
            f(ds.k, ds.k_batch_stride, kh);
      for (int c = 0; c < dm.d_v; ++c)
        seg.v[(static_cast<std::size_t>(j) * dm.h_k + kh) * dm.d_v + c] *=
            f(ds.v, ds.v_batch_stride, kh);
    }
}

// Rounds a value of the fp32 low-precision reference to storage dtype `t`.
template <typename T>
T maybe_round(T x, DType t, RefPrecision prec) {
  if (prec == RefPrecision::kF64) return x;
  return static_cast<T>(round_to(t, static_cast<float>(x)));
}

// Copies one segment's results into the global result layout.
//   out rows go to out_row0 + i of [rows, h, d_v]; lse to lse_index(hh, i).
template <typename T, typename LseIndex>
void scatter(const Segment<T>& seg, const Dims& dm, const std::vector<T>& o,
             const std::vector<T>& l, std::int64_t out_row0, LseIndex lse_index, DType out_dtype,
             RefPrecision prec, RefResult& res) {
  for (int i = 0; i < seg.s_q; ++i) {
    for (int hh = 0; hh < dm.h; ++hh) {
      for (int c = 0; c < dm.d_v; ++c) {
        const T x = o[(static_cast<std::size_t>(i) * dm.h + hh) * dm.d_v + c];
        res.out[((out_row0 + i) * dm.h + hh) * dm.d_v + c] =
            static_cast<double>(maybe_round(x, out_dtype, prec));
      }
      const T x = l[static_cast<std::size_t>(hh) * seg.s_q + i];
      res.lse[lse_index(hh, i)] = prec == RefPrecision::kF64
                                      ? static_cast<double>(x)
                                      : static_cast<double>(static_cast<float>(x));
    }
  }
}

template <typename T>
RefResult forward_impl(const FwdParams& p, RefPrecision prec) {
  const Dims dm{p.h, p.h_k, p.d, p.d_v};
  RefResult res;
  if (!p.is_varlen()) {
    // Dense: batch element bi is one segment with the common s_q, s_k.
    res.out.assign(static_cast<std::size_t>(p.b) * p.s_q * p.h * p.d_v, kNaN);
    res.lse.assign(static_cast<std::size_t>(p.b) * p.h * p.s_q, kNaN);
    for (int bi = 0; bi < p.b; ++bi) {
      Segment<T> seg;
      seg.s_q = p.s_q;
      seg.s_k = p.s_k;
      seg.shift =
          p.mask.mask_shift ? p.mask.mask_shift[bi] : static_cast<std::int64_t>(p.s_k) - p.s_q;
      set_chunk_positions(seg, p.mask, bi);
      seg.q.resize(static_cast<std::size_t>(p.s_q) * p.h * p.d);
      seg.k.resize(static_cast<std::size_t>(p.s_k) * p.h_k * p.d);
      seg.v.resize(static_cast<std::size_t>(p.s_k) * p.h_k * p.d_v);
      for (int i = 0; i < p.s_q; ++i) {
        for (int hh = 0; hh < p.h; ++hh) {
          load_row(p.q, bi * p.q_batch_stride + i * p.q_row_stride + hh * p.q_head_stride, p.dtype,
                   p.d, &seg.q[(static_cast<std::size_t>(i) * p.h + hh) * p.d]);
        }
      }
      if (p.qv) {
        seg.qv.resize(static_cast<std::size_t>(p.s_q) * p.h * p.d_v);
        for (int i = 0; i < p.s_q; ++i)
          for (int hh = 0; hh < p.h; ++hh)
            load_row(p.qv, bi * p.qv_batch_stride + i * p.qv_row_stride + hh * p.qv_head_stride,
                     p.dtype, p.d_v, &seg.qv[(static_cast<std::size_t>(i) * p.h + hh) * p.d_v]);
      }
      for (int j = 0; j < p.s_k; ++j) {
        for (int kh = 0; kh < p.h_k; ++kh) {
          load_row(p.k, bi * p.k_batch_stride + j * p.k_row_stride + kh * p.k_head_stride, p.dtype,
                   p.d, &seg.k[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d]);
          load_row(p.v, bi * p.v_batch_stride + j * p.v_row_stride + kh * p.v_head_stride, p.dtype,
                   p.d_v, &seg.v[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d_v]);
        }
      }
      apply_descale(seg, dm, p.descale, bi);
      std::vector<T> o, l;
      attend(seg, dm, p.mask, o, l);
      const std::int64_t base_lse = static_cast<std::int64_t>(bi) * p.h * p.s_q;
      scatter(
          seg, dm, o, l, static_cast<std::int64_t>(bi) * p.s_q,
          [&](int hh, int i) { return base_lse + static_cast<std::int64_t>(hh) * p.s_q + i; },
          p.out_dtype, prec, res);
    }
    return res;
  }
  // Varlen: segment bi covers rows [cu_q[bi], cu_q[bi+1]) and keys [cu_k[bi],
  // cu_k[bi+1]); seqused_q/k shorten them. Rows past seqused_q stay NaN (don't care).
  const std::int64_t total_q = p.cu_seqlens_q[p.b];
  res.out.assign(static_cast<std::size_t>(total_q) * p.h * p.d_v, kNaN);
  res.lse.assign(static_cast<std::size_t>(p.h) * total_q, kNaN);
  for (int bi = 0; bi < p.b; ++bi) {
    const std::int64_t q0 = p.cu_seqlens_q[bi];
    const std::int64_t k0 = p.cu_seqlens_k[bi];
    Segment<T> seg;
    seg.s_q = p.seqused_q ? p.seqused_q[bi] : p.cu_seqlens_q[bi + 1] - p.cu_seqlens_q[bi];
    seg.s_k = p.seqused_k ? p.seqused_k[bi] : p.cu_seqlens_k[bi + 1] - p.cu_seqlens_k[bi];
    seg.shift =
        p.mask.mask_shift ? p.mask.mask_shift[bi] : static_cast<std::int64_t>(seg.s_k) - seg.s_q;
    set_chunk_positions(seg, p.mask, bi);
    seg.q.resize(static_cast<std::size_t>(seg.s_q) * p.h * p.d);
    seg.k.resize(static_cast<std::size_t>(seg.s_k) * p.h_k * p.d);
    seg.v.resize(static_cast<std::size_t>(seg.s_k) * p.h_k * p.d_v);
    for (int i = 0; i < seg.s_q; ++i) {
      for (int hh = 0; hh < p.h; ++hh) {
        load_row(p.q, (q0 + i) * p.q_row_stride + hh * p.q_head_stride, p.dtype, p.d,
                 &seg.q[(static_cast<std::size_t>(i) * p.h + hh) * p.d]);
      }
    }
    if (p.qv) {
      seg.qv.resize(static_cast<std::size_t>(seg.s_q) * p.h * p.d_v);
      for (int i = 0; i < seg.s_q; ++i)
        for (int hh = 0; hh < p.h; ++hh)
          load_row(p.qv, (q0 + i) * p.qv_row_stride + hh * p.qv_head_stride, p.dtype, p.d_v,
                   &seg.qv[(static_cast<std::size_t>(i) * p.h + hh) * p.d_v]);
    }
    for (int j = 0; j < seg.s_k; ++j) {
      for (int kh = 0; kh < p.h_k; ++kh) {
        load_row(p.k, (k0 + j) * p.k_row_stride + kh * p.k_head_stride, p.dtype, p.d,
                 &seg.k[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d]);
        load_row(p.v, (k0 + j) * p.v_row_stride + kh * p.v_head_stride, p.dtype, p.d_v,
                 &seg.v[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d_v]);
      }
    }
    apply_descale(seg, dm, p.descale, bi);
    std::vector<T> o, l;
    attend(seg, dm, p.mask, o, l);
    scatter(
        seg, dm, o, l, q0,
        [&](int hh, int i) { return static_cast<std::int64_t>(hh) * total_q + q0 + i; },
        p.out_dtype, prec, res);
  }
  return res;
}

// Element offset of (token t, kv head kh) of cache sequence `row` (the batch
// element's cache row, i.e. cache_batch_idx[b] or b).
std::int64_t cache_offset(const KvCacheParams& p, bool is_v, int row, std::int64_t t, int kh) {
  const std::int64_t bs = is_v ? p.v_cache_batch_stride : p.k_cache_batch_stride;
  const std::int64_t rs = is_v ? p.v_cache_row_stride : p.k_cache_row_stride;
  const std::int64_t hs = is_v ? p.v_cache_head_stride : p.k_cache_head_stride;
  if (p.is_paged()) {
    const std::int32_t block = p.page_table[row * p.page_table_batch_stride + t / p.page_size];
    return block * bs + (t % p.page_size) * rs + kh * hs;
  }
  return row * bs + t * rs + kh * hs;
}

}  // namespace

template <typename T>
void apply_rotary(T* x, const float* cos, const float* sin, int rotary_dim, bool interleaved,
                  std::int64_t pos) {
  const int half = rotary_dim / 2;
  const float* c = cos + pos * half;
  const float* s = sin + pos * half;
  for (int i = 0; i < half; ++i) {
    const int i0 = interleaved ? 2 * i : i;
    const int i1 = interleaved ? 2 * i + 1 : i + half;
    const T x0 = x[i0], x1 = x[i1];
    const T ci = static_cast<T>(c[i]), si = static_cast<T>(s[i]);
    x[i0] = x0 * ci - x1 * si;
    x[i1] = x0 * si + x1 * ci;
  }
}

template void apply_rotary<double>(double*, const float*, const float*, int, bool, std::int64_t);
template void apply_rotary<float>(float*, const float*, const float*, int, bool, std::int64_t);

namespace {

// Rotary outputs are tensors in the storage dtype (FA applies rotary to q and
// k_new and attends to the stored results): rotate one head vector in fp32 and
// round it to p.dtype. Both precisions use these same rounded values, so the
// comparison measures the attention, not the rotary rounding.
template <typename T>
void rotated_row(const KvCacheParams& p, const void* src, std::int64_t off, std::int64_t pos,
                 T* dst) {
  std::vector<float> x(static_cast<std::size_t>(p.d));
  load_row(src, off, p.dtype, p.d, x.data());
  apply_rotary(x.data(), p.rotary_cos, p.rotary_sin, p.rotary_dim, p.rotary_interleaved, pos);
  for (int c = 0; c < p.d; ++c) dst[c] = static_cast<T>(round_to(p.dtype, x[c]));
}

template <typename T>
RefResult kvcache_impl(const KvCacheParams& p, RefPrecision prec) {
  const Dims dm{p.h, p.h_k, p.d, p.d_v};
  RefResult res;
  // Varlen queries (cu_seqlens_q): out [total_q, h, d_v], lse [h, total_q]; new keys per
  // sequence from cu_seqlens_k_new. Otherwise [b, s_q, h, d_v] / [b, h, s_q], s_new each.
  const bool vq = p.cu_seqlens_q != nullptr, vk = p.cu_seqlens_k_new != nullptr;
  const std::int64_t total_q = vq ? p.cu_seqlens_q[p.b] : std::int64_t{p.b} * p.s_q;
  res.out.assign(static_cast<std::size_t>(total_q) * p.h * p.d_v, kNaN);
  res.lse.assign(static_cast<std::size_t>(total_q) * p.h, kNaN);
  const bool rotary = p.rotary_cos != nullptr;
  const bool windowed =
      p.mask.window_left >= 0 || p.mask.window_right >= 0 || p.mask.attention_chunk > 0;
  for (int bi = 0; bi < p.b; ++bi) {
    const int row = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
    const std::int64_t seqlen = p.cache_seqlens[bi];
    const std::int64_t leftpad = p.cache_leftpad ? p.cache_leftpad[bi] : 0;
    // Keys are renumbered from leftpad: key j is cache token leftpad + j, and the
    // appended rows follow the cached ones.
    const std::int64_t q0 = vq ? p.cu_seqlens_q[bi] : std::int64_t{bi} * p.s_q;
    const std::int64_t n_new = vk ? p.cu_seqlens_k_new[bi + 1] - p.cu_seqlens_k_new[bi] : p.s_new;
    Segment<T> seg;
    seg.s_q = vq ? static_cast<int>(p.cu_seqlens_q[bi + 1] - q0) : p.s_q;
    seg.s_k = static_cast<int>(seqlen - leftpad + n_new);
    seg.shift =
        p.mask.mask_shift ? p.mask.mask_shift[bi] : static_cast<std::int64_t>(seg.s_k) - seg.s_q;
    set_chunk_positions(seg, p.mask, bi);
    // Rotary position of the first new row: its absolute slot, or rotary_seqlens (FA3).
    const std::int64_t rot_pos0 = p.rotary_seqlens ? p.rotary_seqlens[bi] : seqlen;
    seg.q.resize(static_cast<std::size_t>(seg.s_q) * p.h * p.d);
    for (int i = 0; i < seg.s_q; ++i) {
      for (int hh = 0; hh < p.h; ++hh) {
        T* dst = &seg.q[(static_cast<std::size_t>(i) * p.h + hh) * p.d];
        const std::int64_t off =
            (vq ? (q0 + i) * p.q_row_stride : bi * p.q_batch_stride + i * p.q_row_stride) +
            hh * p.q_head_stride;
        if (rotary) {
          // FA: q rows follow the new keys' positions under causal/local masks,
          // otherwise all sit at the first new position.
          const std::int64_t pos = (p.mask.causal || windowed) ? rot_pos0 + i : rot_pos0;
          rotated_row(p, p.q, off, pos, dst);
        } else {
          load_row(p.q, off, p.dtype, p.d, dst);
        }
      }
    }
    if (p.qv) {  // never rotated
      seg.qv.resize(static_cast<std::size_t>(seg.s_q) * p.h * p.d_v);
      for (int i = 0; i < seg.s_q; ++i)
        for (int hh = 0; hh < p.h; ++hh)
          load_row(
              p.qv,
              (vq ? (q0 + i) * p.qv_row_stride : bi * p.qv_batch_stride + i * p.qv_row_stride) +
                  hh * p.qv_head_stride,
              p.dtype, p.d_v, &seg.qv[(static_cast<std::size_t>(i) * p.h + hh) * p.d_v]);
    }
    seg.k.resize(static_cast<std::size_t>(seg.s_k) * p.h_k * p.d);
    seg.v.resize(static_cast<std::size_t>(seg.s_k) * p.h_k * p.d_v);
    for (int j = 0; j < seg.s_k; ++j) {
      const std::int64_t t = leftpad + j;
      for (int kh = 0; kh < p.h_k; ++kh) {
        T* kd = &seg.k[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d];
        T* vd = &seg.v[(static_cast<std::size_t>(j) * p.h_k + kh) * p.d_v];
        if (t < seqlen) {
          load_row(p.k_cache, cache_offset(p, false, row, t, kh), p.dtype, p.d, kd);
          load_row(p.v_cache, cache_offset(p, true, row, t, kh), p.dtype, p.d_v, vd);
        } else {
          const std::int64_t r = t - seqlen;
          const std::int64_t n0 = vk ? p.cu_seqlens_k_new[bi] : 0;
          const std::int64_t koff = (vk ? (n0 + r) * p.k_new_row_stride
                                        : bi * p.k_new_batch_stride + r * p.k_new_row_stride) +
                                    kh * p.k_new_head_stride;
          if (rotary) {
            rotated_row(p, p.k_new, koff, rot_pos0 + r, kd);
          } else {
            load_row(p.k_new, koff, p.dtype, p.d, kd);
          }
          load_row(p.v_new,
                   (vk ? (n0 + r) * p.v_new_row_stride
                       : bi * p.v_new_batch_stride + r * p.v_new_row_stride) +
                       kh * p.v_new_head_stride,
                   p.dtype, p.d_v, vd);
        }
      }
    }
    apply_descale(seg, dm, p.descale, bi);
    std::vector<T> o, l;
    attend(seg, dm, p.mask, o, l);
    const std::int64_t base_lse = static_cast<std::int64_t>(bi) * p.h * p.s_q;
    scatter(
        seg, dm, o, l, q0,
        [&](int hh, int i) {
          return vq ? static_cast<std::int64_t>(hh) * total_q + q0 + i
                    : base_lse + static_cast<std::int64_t>(hh) * p.s_q + i;
        },
        p.out_dtype, prec, res);
  }
  return res;
}

}  // namespace

RefResult reference_forward(const FwdParams& p, RefPrecision prec) {
  return prec == RefPrecision::kF64 ? forward_impl<double>(p, prec) : forward_impl<float>(p, prec);
}

RefResult reference_kvcache(const KvCacheParams& p, RefPrecision prec) {
  return prec == RefPrecision::kF64 ? kvcache_impl<double>(p, prec) : kvcache_impl<float>(p, prec);
}

void reference_kvcache_append(const KvCacheParams& p, void* k_cache, void* v_cache) {
  if (p.k_new == nullptr || p.s_new == 0) return;
  std::vector<float> krow(static_cast<std::size_t>(p.d));
  for (int bi = 0; bi < p.b; ++bi) {
    const int row = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
    const std::int64_t seqlen = p.cache_seqlens[bi];
    const bool vk = p.cu_seqlens_k_new != nullptr;
    const int n_new = vk ? p.cu_seqlens_k_new[bi + 1] - p.cu_seqlens_k_new[bi] : p.s_new;
    const std::int64_t n0 = vk ? p.cu_seqlens_k_new[bi] : 0;
    for (int r = 0; r < n_new; ++r) {
      const std::int64_t kn =
          vk ? (n0 + r) * p.k_new_row_stride : bi * p.k_new_batch_stride + r * p.k_new_row_stride;
      const std::int64_t vn0 =
          vk ? (n0 + r) * p.v_new_row_stride : bi * p.v_new_batch_stride + r * p.v_new_row_stride;
      for (int kh = 0; kh < p.h_k; ++kh) {
        load_row(p.k_new, kn + kh * p.k_new_head_stride, p.dtype, p.d, krow.data());
        if (p.rotary_cos != nullptr) {
          const std::int64_t rot0 = p.rotary_seqlens ? p.rotary_seqlens[bi] : seqlen;
          apply_rotary(krow.data(), p.rotary_cos, p.rotary_sin, p.rotary_dim, p.rotary_interleaved,
                       rot0 + r);
        }
        const std::int64_t ko = cache_offset(p, false, row, seqlen + r, kh);
        for (int c = 0; c < p.d; ++c) store_from_f32(k_cache, ko + c, p.dtype, krow[c]);
        const std::int64_t vo = cache_offset(p, true, row, seqlen + r, kh);
        const std::int64_t vn = vn0 + kh * p.v_new_head_stride;
        for (int c = 0; c < p.d_v; ++c) {
          store_from_f32(v_cache, vo + c, p.dtype, load_as_f32(p.v_new, vn + c, p.dtype));
        }
      }
    }
  }
}

void reference_merge(const std::vector<double>& o_parts, const std::vector<double>& lse_parts,
                     std::int64_t n, int num_states, int d_v, std::vector<double>& o,
                     std::vector<double>& lse) {
  const double inf = std::numeric_limits<double>::infinity();
  o.assign(static_cast<std::size_t>(n) * d_v, 0.0);
  lse.assign(static_cast<std::size_t>(n), -inf);
  for (std::int64_t r = 0; r < n; ++r) {
    // docs/semantics.md section 5: lse = m + log(sum_s exp(lse_s - m)), m = max lse_s;
    // o = sum_s o_s exp(lse_s - lse). +inf and -inf both mean "empty".
    double m = -inf;
    for (int s = 0; s < num_states; ++s) {
      const double l = lse_parts[r * num_states + s];
      if (std::isfinite(l) && l > m) m = l;
    }
    if (m == -inf) continue;
    double sum = 0.0;
    for (int s = 0; s < num_states; ++s) {
      const double l = lse_parts[r * num_states + s];
      if (std::isfinite(l)) sum += std::exp(l - m);
    }
    const double total = m + std::log(sum);
    lse[r] = total;
    for (int s = 0; s < num_states; ++s) {
      const double l = lse_parts[r * num_states + s];
      if (!std::isfinite(l)) continue;
      const double w = std::exp(l - total);
      for (int c = 0; c < d_v; ++c) {
        o[r * d_v + c] += o_parts[(r * num_states + s) * d_v + c] * w;
      }
    }
  }
}

}  // namespace ringattn::test
