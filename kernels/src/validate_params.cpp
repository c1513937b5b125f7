// Argument validation for the dense/varlen and KV-cache families. Engine calls it
// before any backend, so backends may assume everything checked here. Every
// failure is an InvalidArgument naming the argument and the values compared.
// All size products use int64 (tensors beyond 2^31 elements are legal).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend.hpp"
#include "kvcache_prepare.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

// One dimension of a strided tensor, for the stride checks.
struct Dim {
  const char* name;  // "batch", "row", "head"
  std::int64_t size;
  std::int64_t stride;
};

void check_storage_dtypes(DType dtype, DType out_dtype) {
  RA_CHECK_ARG(dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16 ||
                   dtype == DType::kFP8E4M3,
               "dtype: " << dtype_name(dtype)
                         << " is not supported here (expected fp32, bf16, fp16 or fp8)");
  if (dtype == DType::kFP8E4M3) {
    RA_CHECK_ARG(out_dtype == DType::kF32 || out_dtype == DType::kBF16,
                 "out_dtype: fp8 inputs write fp32 or bf16 outputs, got " << dtype_name(out_dtype));
    return;
  }
  RA_CHECK_ARG(out_dtype == DType::kF32 || out_dtype == dtype,
               "out_dtype: must be fp32 or equal to dtype (" << dtype_name(dtype) << "), got "
                                                             << dtype_name(out_dtype));
}

// fp8 descales (Fp8Descale): only with fp8 storage; [b, h_k] with batch stride >= 0
// (0 = broadcast) and h_k when the row is not broadcast over more than one sequence;
// every value finite (a NaN descale would silently turn the whole head into NaN).
void check_descale(const Fp8Descale& ds, DType dtype, int b, int h_k) {
  if (!ds.any()) return;
  RA_CHECK_ARG(dtype == DType::kFP8E4M3,
               "q_descale/k_descale/v_descale: only fp8 (e4m3) storage takes descales, dtype is "
                   << dtype_name(dtype) << " (q_descale " << (ds.q ? "set" : "null")
                   << ", k_descale " << (ds.k ? "set" : "null") << ", v_descale "
                   << (ds.v ? "set" : "null") << ")");
  const struct {
    const char* name;
    const float* ptr;
    std::int64_t stride;
  } list[] = {{"q_descale", ds.q, ds.q_batch_stride},
              {"k_descale", ds.k, ds.k_batch_stride},
              {"v_descale", ds.v, ds.v_batch_stride}};
  for (const auto& t : list) {
    if (!t.ptr) continue;
    RA_CHECK_ARG(t.stride == 0 || t.stride >= h_k || b == 1,
                 t.name << ": batch stride " << t.stride << " must be 0 (broadcast) or >= h_k="
                        << h_k << " (a [b, h_k] tensor, strides in elements)");
    for (int bi = 0; bi < b; ++bi) {
      for (int g = 0; g < h_k; ++g) {
        const float x = t.ptr[bi * t.stride + g];
        RA_CHECK_ARG(std::isfinite(x),
                     t.name << "[" << bi << ", " << g << "]=" << x << " must be finite");
      }
    }
  }
}

void check_heads(int h, int h_k, int d, int d_v) {
  RA_CHECK_ARG_GE(h, 1, "h: number of query heads must be >= 1");
  RA_CHECK_ARG_GE(h_k, 1, "h_k: number of key/value heads must be >= 1");
  RA_CHECK_ARG(h % h_k == 0,
               "h_k: number of query heads h=" << h << " must be a multiple of h_k=" << h_k);
  RA_CHECK_ARG(d >= 8 && d <= kMaxHeadDim && d % 8 == 0,
               "d: head dim must be a multiple of 8 in [8, " << kMaxHeadDim << "], got " << d);
  RA_CHECK_ARG(
      d_v >= 8 && d_v <= kMaxHeadDim && d_v % 8 == 0,
      "d_v: value head dim must be a multiple of 8 in [8, " << kMaxHeadDim << "], got " << d_v);
}

// Input tensors (read only): strides must be >= 0, and a dimension with more than
// one entry and a positive stride must not step inside one contiguous row of
// `inner` elements (that is always a units mistake). Stride 0 (broadcast) is legal.
void check_input_strides(const char* tensor, std::int64_t inner, std::initializer_list<Dim> dims) {
  for (const Dim& dim : dims) {
    RA_CHECK_ARG(dim.stride >= 0,
                 tensor << ": " << dim.name << " stride must be >= 0, got " << dim.stride);
    if (dim.size > 1 && dim.stride > 0) {
      RA_CHECK_ARG(dim.stride >= inner, tensor << ": " << dim.name << " stride " << dim.stride
                                               << " is smaller than the contiguous row of " << inner
                                               << " elements (strides are in elements)");
    }
  }
}

// Written tensors (outputs, caches): no two elements may share memory. Sorted by
// stride, each dimension must start past the span of all smaller ones.
void check_output_strides(const char* tensor, std::int64_t inner, std::initializer_list<Dim> dims) {
  std::vector<Dim> ds;
  bool empty = false;
  for (const Dim& dim : dims) {
    RA_CHECK_ARG(dim.stride >= 0,
                 tensor << ": " << dim.name << " stride must be >= 0, got " << dim.stride);
    if (dim.size > 1) ds.push_back(dim);
    if (dim.size == 0) empty = true;
  }
  if (empty) return;  // nothing is written, so no two elements can collide
  std::sort(ds.begin(), ds.end(), [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  std::int64_t span = inner;
  for (const Dim& dim : ds) {
    RA_CHECK_ARG(dim.stride >= span, tensor << ": " << dim.name << " stride " << dim.stride
                                            << " makes entries overlap (the smaller dims span "
                                            << span << " elements)");
    span = dim.stride * (dim.size - 1) + span;
  }
}

// cu_seqlens [b+1]: starts at 0, non-decreasing, every segment <= max_len.
void check_cu_seqlens(const char* name, const std::int32_t* cu, int b, int max_len,
                      const char* max_name) {
  RA_CHECK_ARG_EQ(cu[0], 0, name << "[0]: must start at 0");
  for (int i = 0; i < b; ++i) {
    const std::int64_t len = std::int64_t{cu[i + 1]} - cu[i];
    RA_CHECK_ARG(len >= 0, name << ": must be non-decreasing, got " << name << "[" << i << "]="
                                << cu[i] << " > " << name << "[" << i + 1 << "]=" << cu[i + 1]);
    RA_CHECK_ARG(len <= max_len, name << ": segment " << i << " has length " << len << " > "
                                      << max_name << "=" << max_len);
  }
}

// seqused [b]: 0 <= seqused[i] <= length available for element i.
template <class LenFn>
void check_seqused(const char* name, const std::int32_t* used, int b, LenFn&& len) {
  if (!used) return;
  for (int i = 0; i < b; ++i) {
    const std::int64_t avail = len(i);
    RA_CHECK_ARG(used[i] >= 0 && used[i] <= avail,
                 name << "[" << i << "]=" << used[i] << " must be in [0, " << avail << "]");
  }
}

// qv (FA3): extra query part [.., h, d_v] of q's dtype. The kernels keep d_v within
// kMaxHeadDim; FA3's MLA shape (d = 64, d_v = 512) belongs to the MLA entry points.
// Not with fp8 storage (the descales have no qv factor; FA3 takes qv in 16 bits).
void check_qv(const void* qv, int d_v, DType dtype) {
  if (!qv) return;
  RA_CHECK_ARG(dtype != DType::kFP8E4M3,
               "qv: not supported with fp8 (e4m3) storage; pass qv with fp32, bf16 or fp16 q");
  RA_CHECK_ARG(d_v <= kMaxHeadDim,
               "qv: d_v=" << d_v << " exceeds the limit of " << kMaxHeadDim
                          << " for the value head dim with qv (absorbed MLA with a 512-wide "
                             "latent runs through Engine::mla_decode / flash_mla_interface)");
}

}  // namespace

void validate(const FwdParams& p) {
  check_storage_dtypes(p.dtype, p.out_dtype);
  RA_CHECK_ARG_GE(p.b, 1, "b: batch size must be >= 1");
  RA_CHECK_ARG_GE(p.h_k, 1, "h_k: number of key/value heads must be >= 1");
  check_descale(p.descale, p.dtype, p.b, p.h_k);
  RA_CHECK_ARG_GE(p.s_q, 0, "s_q: query length must be >= 0");
  RA_CHECK_ARG_GE(p.s_k, 0, "s_k: key length must be >= 0");
  check_qv(p.qv, p.d_v, p.dtype);
  check_heads(p.h, p.h_k, p.d, p.d_v);
  validate_mask(p.mask, p.h, p.b);
  RA_CHECK_ARG_GE(p.num_splits, 0, "num_splits: must be >= 0 (0 = engine decides)");

  std::int64_t rows;  // query rows in the whole call
  std::int64_t keys;  // key rows in the whole call
  if (p.is_varlen()) {
    RA_CHECK_ARG(p.cu_seqlens_k != nullptr,
                 "cu_seqlens_k: must be set together with cu_seqlens_q (varlen)");
    check_cu_seqlens("cu_seqlens_q", p.cu_seqlens_q, p.b, p.s_q, "max_seqlen_q (s_q)");
    check_cu_seqlens("cu_seqlens_k", p.cu_seqlens_k, p.b, p.s_k, "max_seqlen_k (s_k)");
    rows = p.cu_seqlens_q[p.b];
    keys = p.cu_seqlens_k[p.b];
    check_seqused("seqused_q", p.seqused_q, p.b,
                  [&](int i) { return std::int64_t{p.cu_seqlens_q[i + 1]} - p.cu_seqlens_q[i]; });
    check_seqused("seqused_k", p.seqused_k, p.b,
                  [&](int i) { return std::int64_t{p.cu_seqlens_k[i + 1]} - p.cu_seqlens_k[i]; });
  } else {
    RA_CHECK_ARG(p.cu_seqlens_k == nullptr,
                 "cu_seqlens_q: must be set together with cu_seqlens_k (varlen)");
    rows = std::int64_t{p.b} * p.s_q;
    keys = std::int64_t{p.b} * p.s_k;
    check_seqused("seqused_q", p.seqused_q, p.b, [&](int) { return std::int64_t{p.s_q}; });
    check_seqused("seqused_k", p.seqused_k, p.b, [&](int) { return std::int64_t{p.s_k}; });
  }
  if (rows > 0) {
    RA_CHECK_ARG(p.q != nullptr, "q: must not be null (" << rows << " query rows)");
    RA_CHECK_ARG(p.out != nullptr, "out: must not be null (" << rows << " query rows)");
    if (keys > 0) {
      RA_CHECK_ARG(p.k != nullptr, "k: must not be null (" << keys << " key rows)");
      RA_CHECK_ARG(p.v != nullptr, "v: must not be null (" << keys << " key rows)");
    }
  }

  // Batch strides only matter for dense calls (varlen packs all rows on one axis).
  const std::int64_t nb = p.is_varlen() ? 1 : p.b;
  const std::int64_t nq = p.is_varlen() ? rows : p.s_q;
  const std::int64_t nk = p.is_varlen() ? keys : p.s_k;
  check_input_strides("q", p.d,
                      {{"batch", nb, p.q_batch_stride},
                       {"row", nq, p.q_row_stride},
                       {"head", p.h, p.q_head_stride}});
  check_input_strides("k", p.d,
                      {{"batch", nb, p.k_batch_stride},
                       {"row", nk, p.k_row_stride},
                       {"head", p.h_k, p.k_head_stride}});
  check_input_strides("v", p.d_v,
                      {{"batch", nb, p.v_batch_stride},
                       {"row", nk, p.v_row_stride},
                       {"head", p.h_k, p.v_head_stride}});
  check_output_strides("out", p.d_v,
                       {{"batch", nb, p.out_batch_stride},
                        {"row", nq, p.out_row_stride},
                        {"head", p.h, p.out_head_stride}});
  if (p.qv) {  // [b, s_q, h, d_v] / [total_q, h, d_v], as out
    check_input_strides("qv", p.d_v,
                        {{"batch", nb, p.qv_batch_stride},
                         {"row", nq, p.qv_row_stride},
                         {"head", p.h, p.qv_head_stride}});
  }
}

void validate(const KvCacheParams& p) {
  check_storage_dtypes(p.dtype, p.out_dtype);
  RA_CHECK_ARG_GE(p.b, 1, "b: batch size must be >= 1");
  RA_CHECK_ARG_GE(p.h_k, 1, "h_k: number of key/value heads must be >= 1");
  check_descale(p.descale, p.dtype, p.b, p.h_k);
  RA_CHECK_ARG_GE(p.s_q, 0, "s_q: query length must be >= 0");
  RA_CHECK_ARG_GE(p.s_new, 0, "s_new: rows of k_new/v_new must be >= 0");
  check_qv(p.qv, p.d_v, p.dtype);
  check_heads(p.h, p.h_k, p.d, p.d_v);
  validate_mask(p.mask, p.h, p.b);
  RA_CHECK_ARG_GE(p.num_splits, 0, "num_splits: must be >= 0 (0 = engine decides)");
  // Variable query rows / new keys per sequence: each segment within max_seqlen_q (s_q)
  // / s_new, so the max-based loops and plans cover it.
  if (p.cu_seqlens_q)
    check_cu_seqlens("cu_seqlens_q", p.cu_seqlens_q, p.b, p.s_q, "max_seqlen_q (s_q)");
  if (p.cu_seqlens_k_new) {
    RA_CHECK_ARG(p.k_new != nullptr, "cu_seqlens_k_new: set without k_new / v_new");
    check_cu_seqlens("cu_seqlens_k_new", p.cu_seqlens_k_new, p.b, p.s_new,
                     "s_new (largest number of new rows)");
  }

  const std::int64_t rows = kv_total_q(p);
  if (rows > 0) {
    RA_CHECK_ARG(p.q != nullptr, "q: must not be null (" << rows << " query rows)");
    RA_CHECK_ARG(p.out != nullptr, "out: must not be null (" << rows << " query rows)");
  }
  RA_CHECK_ARG(p.k_cache != nullptr, "k_cache: must not be null");
  RA_CHECK_ARG(p.v_cache != nullptr, "v_cache: must not be null");
  RA_CHECK_ARG(p.cache_seqlens != nullptr, "cache_seqlens: must not be null ([b] int32)");
  RA_CHECK_ARG((p.k_new == nullptr) == (p.v_new == nullptr),
               "k_new/v_new: must be set together (k_new "
                   << (p.k_new ? "set" : "null") << ", v_new " << (p.v_new ? "set" : "null")
                   << ")");
  RA_CHECK_ARG(p.s_new == 0 || p.k_new != nullptr,
               "k_new: must not be null when s_new=" << p.s_new << " > 0");

  // Cache geometry and capacity per sequence.
  std::int64_t capacity;
  if (p.is_paged()) {
    RA_CHECK_ARG_GE(p.page_size, 1, "page_size: must be >= 1");
    RA_CHECK_ARG_GE(p.num_blocks, 1, "num_blocks: must be >= 1");
    RA_CHECK_ARG_GE(p.max_pages, 1, "max_pages: page table width must be >= 1");
    RA_CHECK_ARG(p.b == 1 || p.page_table_batch_stride >= p.max_pages,
                 "page_table_batch_stride: must be >= max_pages=" << p.max_pages << ", got "
                                                                  << p.page_table_batch_stride);
    capacity = std::int64_t{p.max_pages} * p.page_size;
  } else {
    RA_CHECK_ARG_GE(p.b_cache, 1, "b_cache: number of cache sequences must be >= 1");
    RA_CHECK_ARG_GE(p.s_cache, 0, "s_cache: cache capacity must be >= 0");
    capacity = p.s_cache;
    if (!p.cache_batch_idx) {
      RA_CHECK_ARG_LE(p.b, p.b_cache,
                      "b_cache: without cache_batch_idx sequence i uses cache row i, so the dense "
                      "cache needs at least b rows");
    }
  }
  // Rows of the dense cache (or of the page table) that cache_batch_idx may name.
  const std::int64_t idx_limit = p.is_paged() ? p.b : p.b_cache;
  for (int i = 0; i < p.b; ++i) {
    if (p.cache_batch_idx) {
      RA_CHECK_ARG(p.cache_batch_idx[i] >= 0 && p.cache_batch_idx[i] < idx_limit,
                   "cache_batch_idx[" << i << "]=" << p.cache_batch_idx[i] << " must be in [0, "
                                      << idx_limit << ")");
    }
    const std::int64_t c = p.cache_seqlens[i];
    RA_CHECK_ARG(c >= 0, "cache_seqlens[" << i << "]=" << c << " must be >= 0");
    const std::int64_t lp = kv_leftpad(p, i);
    RA_CHECK_ARG(lp >= 0 && lp <= c, "cache_leftpad[" << i << "]=" << lp << " must be in [0, "
                                                      << "cache_seqlens[" << i << "]=" << c << "]");
    const std::int64_t s_new_i = kv_s_new(p, i);
    RA_CHECK_ARG(c + s_new_i <= capacity,
                 "cache_seqlens[" << i << "]=" << c << " + s_new=" << s_new_i << " exceeds the "
                                  << (p.is_paged() ? "page table capacity max_pages*page_size="
                                                   : "cache capacity s_cache=")
                                  << capacity);
    if (p.is_paged()) {
      // Every page holding a slot in [leftpad, cache_seqlens + s_new) is read or written.
      const std::int32_t* pt = p.page_table + kv_cache_row(p, i) * p.page_table_batch_stride;
      const std::int64_t end = c + s_new_i;
      if (end > lp) {
        for (std::int64_t pg = lp / p.page_size; pg <= (end - 1) / p.page_size; ++pg) {
          RA_CHECK_ARG(pt[pg] >= 0 && pt[pg] < p.num_blocks,
                       "page_table[" << kv_cache_row(p, i) << ", " << pg << "]=" << pt[pg]
                                     << " must be in [0, num_blocks=" << p.num_blocks
                                     << ") (page used by sequence " << i << ")");
        }
      }
    }
  }
  // Two sequences appending into the same dense cache row would race and overwrite.
  if (p.cache_batch_idx && !p.is_paged() && p.s_new > 0) {
    std::vector<int> owner(static_cast<std::size_t>(p.b_cache), -1);
    for (int i = 0; i < p.b; ++i) {
      int& o = owner[static_cast<std::size_t>(p.cache_batch_idx[i])];
      RA_CHECK_ARG(o < 0, "cache_batch_idx: sequences " << o << " and " << i
                                                        << " both append into cache row "
                                                        << p.cache_batch_idx[i]);
      o = i;
    }
  }

  // Rotary tables must cover the largest position used (kvcache_prepare.hpp).
  RA_CHECK_ARG(p.rotary_seqlens == nullptr || p.rotary_cos != nullptr,
               "rotary_seqlens: set without rotary_cos / rotary_sin");
  if (p.rotary_cos || p.rotary_sin) {
    RA_CHECK_ARG(p.dtype != DType::kFP8E4M3,
                 "rotary_cos/rotary_sin: rotary embedding is not supported with fp8 storage "
                 "(rotate q and k before quantising them)");
    RA_CHECK_ARG(p.rotary_cos && p.rotary_sin, "rotary_cos/rotary_sin: must be set together");
    RA_CHECK_ARG(p.rotary_dim >= 2 && p.rotary_dim % 2 == 0 && p.rotary_dim <= p.d,
                 "rotary_dim: must be even and in [2, d=" << p.d << "], got " << p.rotary_dim);
    for (int i = 0; p.rotary_seqlens && i < p.b; ++i) {
      RA_CHECK_ARG(p.rotary_seqlens[i] >= 0,
                   "rotary_seqlens[" << i << "]=" << p.rotary_seqlens[i] << " must be >= 0");
    }
    std::int64_t max_pos = -1;
    for (int i = 0; i < p.b; ++i) {
      if (kv_s_new(p, i) > 0)
        max_pos = std::max(max_pos, kv_rotary_pos_k(p, i, kv_s_new(p, i) - 1));
      if (kv_s_q(p, i) > 0) max_pos = std::max(max_pos, kv_rotary_pos_q(p, i, kv_s_q(p, i) - 1));
    }
    RA_CHECK_ARG(max_pos < p.s_rotary, "s_rotary: rotary tables have "
                                           << p.s_rotary << " positions, need " << max_pos + 1);
  }

  if (p.plan) {
    RA_CHECK_ARG_EQ(p.plan->b, p.b, "plan: made for a different batch size");
    RA_CHECK_ARG_EQ(p.plan->num_splits.size(), static_cast<std::size_t>(p.b),
                    "plan: num_splits must have one entry per sequence");
    for (int i = 0; i < p.b; ++i) {
      RA_CHECK_ARG(p.plan->num_splits[static_cast<std::size_t>(i)] >= 1,
                   "plan: num_splits[" << i
                                       << "]=" << p.plan->num_splits[static_cast<std::size_t>(i)]
                                       << " must be >= 1");
    }
  }

  // Strides. Caches are written (append), so they must not overlap.
  const std::int64_t cb = p.is_paged() ? p.num_blocks : p.b_cache;
  const std::int64_t cs = p.is_paged() ? p.page_size : p.s_cache;
  // Varlen queries / new keys: one packed row axis, no batch axis.
  const std::int64_t qb = p.cu_seqlens_q ? 1 : p.b, qr = p.cu_seqlens_q ? rows : p.s_q;
  const std::int64_t nb = p.cu_seqlens_k_new ? 1 : p.b;
  const std::int64_t nr = p.cu_seqlens_k_new ? std::int64_t{p.cu_seqlens_k_new[p.b]} : p.s_new;
  check_input_strides("q", p.d,
                      {{"batch", qb, p.q_batch_stride},
                       {"row", qr, p.q_row_stride},
                       {"head", p.h, p.q_head_stride}});
  check_output_strides("k_cache", p.d,
                       {{"batch", cb, p.k_cache_batch_stride},
                        {"row", cs, p.k_cache_row_stride},
                        {"head", p.h_k, p.k_cache_head_stride}});
  check_output_strides("v_cache", p.d_v,
                       {{"batch", cb, p.v_cache_batch_stride},
                        {"row", cs, p.v_cache_row_stride},
                        {"head", p.h_k, p.v_cache_head_stride}});
  if (p.k_new) {
    check_input_strides("k_new", p.d,
                        {{"batch", nb, p.k_new_batch_stride},
                         {"row", nr, p.k_new_row_stride},
                         {"head", p.h_k, p.k_new_head_stride}});
    check_input_strides("v_new", p.d_v,
                        {{"batch", nb, p.v_new_batch_stride},
                         {"row", nr, p.v_new_row_stride},
                         {"head", p.h_k, p.v_new_head_stride}});
  }
  check_output_strides("out", p.d_v,
                       {{"batch", qb, p.out_batch_stride},
                        {"row", qr, p.out_row_stride},
                        {"head", p.h, p.out_head_stride}});
  if (p.qv) {  // [b, s_q, h, d_v] / [total_q, h, d_v], as out
    check_input_strides("qv", p.d_v,
                        {{"batch", qb, p.qv_batch_stride},
                         {"row", qr, p.qv_row_stride},
                         {"head", p.h, p.qv_head_stride}});
  }
}

}  // namespace ringattn::detail

namespace ringattn {

void validate_mask(const MaskParams& m, int h, int b) {
  RA_CHECK_ARG_GE(m.window_left, -1, "window_left: must be >= -1 (-1 = unbounded)");
  RA_CHECK_ARG_GE(m.window_right, -1, "window_right: must be >= -1 (-1 = unbounded)");
  RA_CHECK_ARG(std::isfinite(m.softcap) && m.softcap >= 0.0f,
               "softcap: must be finite and >= 0 (0 = off), got " << m.softcap);
  RA_CHECK_ARG(
      std::isfinite(m.scale),
      "scale: must be finite (0 = 1/sqrt(d), or 1/sqrt(d + d_v) with qv), got " << m.scale);
  RA_CHECK_ARG_GE(m.attention_chunk, 0, "attention_chunk: must be >= 0 (0 = off)");
  RA_CHECK_ARG((m.chunk_q_pos == nullptr) == (m.chunk_k_pos == nullptr),
               "chunk_q_pos / chunk_k_pos: must be set together (chunk_q_pos "
                   << (m.chunk_q_pos ? "set" : "null") << ", chunk_k_pos "
                   << (m.chunk_k_pos ? "set" : "null") << ")");
  RA_CHECK_ARG(m.chunk_q_pos == nullptr || m.attention_chunk > 0,
               "chunk_q_pos / chunk_k_pos: only valid with attention_chunk > 0, got "
               "attention_chunk = "
                   << m.attention_chunk);
  RA_CHECK_ARG_GE(m.chunk_stride, 1, "chunk_stride");
  RA_CHECK_ARG(m.chunk_stride == 1 || m.chunk_q_pos != nullptr,
               "chunk_stride = " << m.chunk_stride
                                 << ": only valid with chunk_q_pos / chunk_k_pos (1 otherwise)");
  if (m.chunk_q_pos != nullptr) {
    constexpr std::int64_t kLimit = std::int64_t{1} << 60;
    for (int i = 0; i < b; ++i) {
      RA_CHECK_ARG(m.chunk_q_pos[i] > -kLimit && m.chunk_q_pos[i] < kLimit,
                   "chunk_q_pos[" << i << "] = " << m.chunk_q_pos[i] << " outside (-2^60, 2^60)");
      RA_CHECK_ARG(m.chunk_k_pos[i] > -kLimit && m.chunk_k_pos[i] < kLimit,
                   "chunk_k_pos[" << i << "] = " << m.chunk_k_pos[i] << " outside (-2^60, 2^60)");
    }
  }
  if (m.sinks != nullptr) {
    for (int i = 0; i < h; ++i) {
      RA_CHECK_ARG(!std::isnan(m.sinks[i]),
                   "sinks[" << i << "]: NaN (use -inf for a head without a sink)");
    }
  }
}

}  // namespace ringattn
