// Reference MLA decode: plain loops, fp64 accumulation, no tiling or splits.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "mla/mla_internal.hpp"
#include "mla/mla_kernels.hpp"

namespace ringattn::detail {

namespace {

// Token at cache slot `slot` as 576 doubles (fp8 decoded exactly, packed layout
// times its tile scales).
void load_token_ref(const MlaDecodeParams& p, std::int64_t slot, double* dst) {
  const auto* base = static_cast<const std::uint8_t*>(p.kv_cache);
  if (p.cache_layout == MlaCacheLayout::kFlashMlaFp8Packed656) {
    const std::uint8_t* t = base + slot * kMlaFp8PackedBytes;
    for (int c = 0; c < kMlaValueDim; ++c) {
      float sc;
      std::memcpy(&sc, t + kMlaValueDim + 4 * (c / 128), 4);
      dst[c] = static_cast<double>(fp8e4m3_to_f32(t[c])) * sc;
    }
    for (int c = 0; c < kMlaRopeDim; ++c) {
      std::uint16_t h;
      std::memcpy(&h, t + kMlaValueDim + 16 + 2 * c, 2);
      dst[kMlaValueDim + c] = bf16_to_f32(h);
    }
    return;
  }
  for (int c = 0; c < kMlaHeadDim; ++c)
    dst[c] = load_as_f32(p.kv_cache, slot * kMlaHeadDim + c, p.kv_dtype);
}

}  // namespace

void mla_decode_reference(const MlaDecodeParams& p, int threads) {
  const double sc = mla::decode_score_scale(p);
  const double out_mul = p.bmm2_scale > 0.0f ? p.bmm2_scale : 1.0;
  const int n_rows = p.b * p.s_q;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int row = 0; row < n_rows; ++row) {
    const int i = row / p.s_q, s = row % p.s_q;
    // Keys of this query token, as cache slots.
    std::vector<std::int64_t> slots;
    if (p.is_sparse()) {
      // The first topk_length[i] entries; -1 and (when allowed) out-of-range slots skipped.
      const std::int64_t n_slots = static_cast<std::int64_t>(p.num_blocks) * p.page_size;
      const int used = p.topk_length != nullptr ? p.topk_length[i] : p.topk;
      const std::int32_t* idx = p.indices + static_cast<std::int64_t>(row) * p.topk;
      for (int k = 0; k < used; ++k)
        if (idx[k] >= 0 && idx[k] < n_slots) slots.push_back(idx[k]);
    } else {
      // Bottom-right causal limit; <= 0 (L < s_q) leaves the row without keys.
      const std::int64_t L = p.cache_seqlens[i];
      const std::int64_t n = p.causal ? L - p.s_q + s + 1 : L;
      for (std::int64_t j = 0; j < n; ++j)
        slots.push_back(
            static_cast<std::int64_t>(
                p.block_table[static_cast<std::int64_t>(i) * p.max_blocks + j / p.page_size]) *
                p.page_size +
            j % p.page_size);
    }
    const std::size_t n = slots.size();
    std::vector<double> kv(n * kMlaHeadDim);
    for (std::size_t j = 0; j < n; ++j) load_token_ref(p, slots[j], kv.data() + j * kMlaHeadDim);
    std::vector<double> sc_row(n), acc(kMlaValueDim), qd(kMlaHeadDim);
    for (int h = 0; h < p.h_q; ++h) {
      const std::int64_t qrow = static_cast<std::int64_t>(row) * p.h_q + h;
      for (int c = 0; c < kMlaHeadDim; ++c)
        qd[c] = load_as_f32(p.q, qrow * kMlaHeadDim + c, p.q_dtype);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::size_t j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int c = 0; c < kMlaHeadDim; ++c) dot += qd[c] * kv[j * kMlaHeadDim + c];
        sc_row[j] = dot * sc;
        mx = std::max(mx, sc_row[j]);
      }
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::size_t j = 0; j < n; ++j) {
        const double e = std::exp(sc_row[j] - mx);
        sum += e;
        for (int c = 0; c < kMlaValueDim; ++c) acc[c] += e * kv[j * kMlaHeadDim + c];
      }
      const double lse = n == 0 ? -std::numeric_limits<double>::infinity() : mx + std::log(sum);
      // Sink (docs/semantics.md section 7): exp(lse) / (exp(lse) + exp(sink)).
      double sink_mul = 1.0;
      if (p.sinks != nullptr && n != 0) sink_mul = 1.0 / (1.0 + std::exp(p.sinks[h] - lse));
      for (int c = 0; c < kMlaValueDim; ++c) {
        const double v = n == 0 ? 0.0 : acc[c] / sum * out_mul * sink_mul;
        store_from_f32(p.out, qrow * kMlaValueDim + c, p.out_dtype, static_cast<float>(v));
      }
      if (p.lse != nullptr)
        p.lse[(static_cast<std::int64_t>(i) * p.h_q + h) * p.s_q + s] = static_cast<float>(lse);
      if (p.max_logits != nullptr) p.max_logits[qrow] = static_cast<float>(mx);
    }
  }
}

}  // namespace ringattn::detail
