// Argument checks for the MLA entry points. Every failure names the argument and
// the values it compared.
#include <cmath>
#include <vector>

#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

void check_scale(float v, const char* name) {
  RA_CHECK_ARG(std::isfinite(v) && v >= 0.0f,
               name << ": must be finite and >= 0 (0 = unset), got " << v);
}

}  // namespace

void validate(const MlaDecodeParams& p) {
  RA_CHECK_ARG(p.q != nullptr, "q: null pointer");
  RA_CHECK_ARG(p.kv_cache != nullptr, "kv_cache: null pointer");
  RA_CHECK_ARG(p.out != nullptr, "out: null pointer");
  RA_CHECK_ARG(p.q_dtype == DType::kF32 || p.q_dtype == DType::kBF16,
               "q: dtype must be fp32 or bf16, got " << dtype_name(p.q_dtype));
  RA_CHECK_ARG(p.out_dtype == DType::kF32 || p.out_dtype == p.q_dtype,
               "out: dtype must be fp32 or q's dtype (" << dtype_name(p.q_dtype) << "), got "
                                                        << dtype_name(p.out_dtype));
  RA_CHECK_ARG(
      p.kv_dtype == DType::kF32 || p.kv_dtype == DType::kBF16 || p.kv_dtype == DType::kFP8E4M3,
      "kv_cache: dtype must be fp32, bf16 or fp8, got " << dtype_name(p.kv_dtype));
  RA_CHECK_ARG_EQ(p.head_dim, kMlaHeadDim,
                  "q/kv_cache: last dim must be 576 (512 latent + 64 rope)");
  if (p.cache_layout == MlaCacheLayout::kFlashMlaFp8Packed656)
    RA_CHECK_ARG(p.kv_dtype == DType::kFP8E4M3,
                 "kv_cache: the FlashMLA 656-byte layout holds fp8, but kv_dtype is "
                     << dtype_name(p.kv_dtype));
  RA_CHECK_ARG_GE(p.b, 1, "b: batch size");
  RA_CHECK_ARG_GE(p.s_q, 1, "s_q: query tokens per sequence");
  RA_CHECK_ARG_LE(p.s_q, kMlaMaxQueryTokens, "s_q: query tokens per sequence out of range");
  RA_CHECK_ARG_GE(p.h_q, 1, "h_q: query heads");
  RA_CHECK_ARG_LE(p.h_q, kMlaMaxHeads, "h_q: query heads out of range");
  RA_CHECK_ARG_GE(p.num_blocks, 1, "num_blocks: cache blocks");
  RA_CHECK_ARG_GE(p.page_size, 1, "page_size: tokens per cache block");
  check_scale(p.scale, "scale");
  check_scale(p.bmm1_scale, "bmm1_scale");
  check_scale(p.bmm2_scale, "bmm2_scale");
  RA_CHECK_ARG(!(p.scale > 0.0f && p.bmm1_scale > 0.0f),
               "scale / bmm1_scale: set one of them (bmm1_scale includes the softmax scale), got "
                   << p.scale << " and " << p.bmm1_scale);
  if (p.kv_dtype == DType::kFP8E4M3 && p.cache_layout == MlaCacheLayout::kDense576) {
    RA_CHECK_ARG(p.bmm1_scale > 0.0f,
                 "bmm1_scale: fp8 cache needs its scale (q_scale * k_scale * sm_scale), got "
                     << p.bmm1_scale);
    RA_CHECK_ARG(p.bmm2_scale > 0.0f,
                 "bmm2_scale: fp8 cache needs its scale (v_scale * o_scale), got " << p.bmm2_scale);
  }
  RA_CHECK_ARG_GE(p.num_splits, 0, "num_splits: 0 = auto");
  const std::int64_t slots = static_cast<std::int64_t>(p.num_blocks) * p.page_size;

  if (p.sinks != nullptr) {
    for (int h = 0; h < p.h_q; ++h)
      RA_CHECK_ARG(!std::isnan(p.sinks[h]),
                   "sinks[" << h << "]: NaN (use -inf for a head without a sink)");
  }
  if (p.is_sparse()) {
    RA_CHECK_ARG_GE(p.topk, 1, "topk: indices per query token");
    RA_CHECK_ARG(!p.causal, "causal: not used with sparse indices (the indices select the keys)");
    if (p.topk_length != nullptr) {
      for (int i = 0; i < p.b; ++i)
        RA_CHECK_ARG(p.topk_length[i] >= 0 && p.topk_length[i] <= p.topk,
                     "topk_length[" << i << "]: " << p.topk_length[i]
                                    << " outside [0, topk = " << p.topk << "]");
    }
    // Strict mode: every entry a row uses must be -1 or a slot (entries past the row's
    // topk_length are never read, so they are not checked).
    if (!p.invalid_indices_as_padding) {
      for (int i = 0; i < p.b; ++i) {
        const int used = p.topk_length != nullptr ? p.topk_length[i] : p.topk;
        for (int s = 0; s < p.s_q; ++s) {
          const std::int32_t* row = p.indices + (static_cast<std::int64_t>(i) * p.s_q + s) * p.topk;
          for (int k = 0; k < used; ++k) {
            const std::int64_t v = row[k];
            RA_CHECK_ARG(v >= -1 && v < slots,
                         "indices[" << i << ", " << s << ", " << k << "]: " << v
                                    << ", expected -1 or a slot in [0, " << slots << ")");
          }
        }
      }
    }
  } else {
    RA_CHECK_ARG(p.topk_length == nullptr,
                 "topk_length: only used with sparse indices (indices is null)");
    RA_CHECK_ARG(p.block_table != nullptr, "block_table: null pointer (dense decode)");
    RA_CHECK_ARG(p.cache_seqlens != nullptr, "cache_seqlens: null pointer (dense decode)");
    RA_CHECK_ARG_GE(p.max_blocks, 1, "max_blocks: block_table columns");
    const std::int64_t cap = static_cast<std::int64_t>(p.max_blocks) * p.page_size;
    for (int i = 0; i < p.b; ++i) {
      const std::int64_t L = p.cache_seqlens[i];
      RA_CHECK_ARG(L >= 0 && L <= cap,
                   "cache_seqlens[" << i << "]: " << L
                                    << " outside [0, max_blocks * page_size = " << cap << "]");
      const std::int64_t pages = (L + p.page_size - 1) / p.page_size;
      for (std::int64_t pg = 0; pg < pages; ++pg) {
        const std::int32_t blk = p.block_table[i * static_cast<std::int64_t>(p.max_blocks) + pg];
        RA_CHECK_ARG(blk >= 0 && blk < p.num_blocks,
                     "block_table[" << i << ", " << pg << "]: block " << blk
                                    << " outside [0, num_blocks = " << p.num_blocks << ")");
      }
    }
  }
  if (p.plan != nullptr) {
    const std::size_t want = p.is_sparse() ? static_cast<std::size_t>(p.b) * p.s_q : p.b;
    RA_CHECK_ARG_EQ(p.plan->num_splits.size(), want,
                    "plan: num_splits entries must match the decode problems (b, or b * s_q "
                    "when sparse)");
    for (std::int32_t v : p.plan->num_splits) RA_CHECK_ARG_GE(v, 1, "plan: num_splits entry");
  }
}

void validate(const MlaSparsePrefillParams& p) {
  RA_CHECK_ARG(p.q != nullptr, "q: null pointer");
  RA_CHECK_ARG(p.kv != nullptr, "kv: null pointer");
  RA_CHECK_ARG(p.out != nullptr, "out: null pointer");
  RA_CHECK_ARG(p.cu_seqlens != nullptr, "cu_seqlens: null pointer");
  RA_CHECK_ARG(p.indices != nullptr, "indices: null pointer");
  RA_CHECK_ARG(p.dtype == DType::kF32 || p.dtype == DType::kBF16,
               "q/kv: dtype must be fp32 or bf16, got " << dtype_name(p.dtype));
  RA_CHECK_ARG_EQ(p.head_dim, kMlaHeadDim, "q/kv: last dim must be 576 (512 latent + 64 rope)");
  RA_CHECK_ARG_GE(p.b, 1, "b: number of sequences");
  RA_CHECK_ARG_GE(p.h_q, 1, "h_q: query heads");
  RA_CHECK_ARG_LE(p.h_q, kMlaMaxHeads, "h_q: query heads out of range");
  RA_CHECK_ARG_GE(p.topk, 1, "topk: indices per query token");
  check_scale(p.scale, "scale");
  RA_CHECK_ARG(std::isfinite(p.masked_dense_max_ratio) && p.masked_dense_max_ratio >= 0.0f,
               "masked_dense_max_ratio: must be finite and >= 0, got " << p.masked_dense_max_ratio);
  RA_CHECK_ARG_EQ(p.cu_seqlens[0], 0, "cu_seqlens[0]");
  RA_CHECK_ARG_EQ(p.cu_seqlens[p.b], p.total, "cu_seqlens[b] must equal total");
  std::vector<std::int64_t> seen;
  std::int64_t stamp = 0;
  for (int i = 0; i < p.b; ++i) {
    const std::int32_t t0 = p.cu_seqlens[i], t1 = p.cu_seqlens[i + 1];
    RA_CHECK_ARG_LE(t0, t1, "cu_seqlens: must be non-decreasing");
    const int s = t1 - t0;
    seen.assign(s, -1);
    for (int t = t0; t < t1; ++t) {
      ++stamp;
      const std::int32_t* idx = p.indices + static_cast<std::int64_t>(t) * p.topk;
      for (int k = 0; k < p.topk; ++k) {
        const std::int32_t v = idx[k];
        if (v == -1) continue;
        RA_CHECK_ARG(v >= 0 && v < s, "indices[" << t << ", " << k << "]: " << v
                                                 << " outside [0, s = " << s << ") of sequence "
                                                 << i << " (-1 = padding)");
        RA_CHECK_ARG(seen[v] != stamp,
                     "indices[" << t << "]: key " << v << " listed twice (sequence " << i << ")");
        seen[v] = stamp;
      }
    }
  }
}

}  // namespace ringattn::detail
