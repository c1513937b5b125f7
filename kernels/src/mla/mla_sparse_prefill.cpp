// Sparse MLA prefill (DeepSeek V3.2 style): three algorithms that give the same
// result to rounding, and the rule that picks one (documented in mla_params.hpp).
//
//   dense_causal   every row lists exactly its causal keys {0..i}: plain causal
//                  attention over key tiles, no index lookups at all
//   masked_dense   blocks of query tokens sweep key tiles [0, largest index] and mask
//                  unselected keys with a per-token bitmask: contiguous, tile-shared
//                  reads, but it computes scores for unselected keys too
//   sparse_gather  each query token gathers its own topk keys: minimal arithmetic,
//                  but no key is shared between query tokens
//
// All three run the one tile loop of mla_core.cpp (run_unit).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mla/mla_internal.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

using mla::KeyList;
using mla::RowMask;
using mla::UnitSpec;

constexpr int kUnitRows = 256;  // query rows per unit (whole tokens)

float prefill_scale(const MlaSparsePrefillParams& p) {
  return p.scale > 0.0f ? p.scale : 1.0f / std::sqrt(static_cast<float>(kMlaHeadDim));
}

// True when each row t (local position r) lists exactly the keys {0..r}. Indices are
// validated duplicate-free, so counting the entries <= r suffices.
bool rows_are_causal_complete(const MlaSparsePrefillParams& p) {
  for (int i = 0; i < p.b; ++i)
    for (int t = p.cu_seqlens[i]; t < p.cu_seqlens[i + 1]; ++t) {
      const int r = t - p.cu_seqlens[i];
      const std::int32_t* idx = p.indices + static_cast<std::int64_t>(t) * p.topk;
      int count = 0;
      for (int k = 0; k < p.topk; ++k) {
        if (idx[k] < 0) continue;
        if (idx[k] > r) return false;
        ++count;
      }
      if (count != r + 1) return false;
    }
  return true;
}

}  // namespace

MlaPrefillPath mla_choose_prefill_path(const MlaSparsePrefillParams& p) {
  if (p.path == MlaPrefillPath::kMaskedDense || p.path == MlaPrefillPath::kSparseGather)
    return p.path;
  const bool exact = rows_are_causal_complete(p);
  if (p.path == MlaPrefillPath::kDenseCausal) {
    RA_CHECK_ARG(exact,
                 "path: dense_causal needs every query token i to list exactly the keys "
                 "{0..i} (sequences no longer than topk = "
                     << p.topk << "); use auto, masked_dense or sparse_gather");
    return p.path;
  }
  if (exact) return MlaPrefillPath::kDenseCausal;
  int s_max = 0;
  for (int i = 0; i < p.b; ++i) s_max = std::max(s_max, p.cu_seqlens[i + 1] - p.cu_seqlens[i]);
  if (static_cast<double>(s_max) <= static_cast<double>(p.masked_dense_max_ratio) * p.topk)
    return MlaPrefillPath::kMaskedDense;
  return MlaPrefillPath::kSparseGather;
}

void mla_sparse_prefill_cpu(const MlaSparsePrefillParams& p, CpuIsa isa, int threads) {
  const mla::Ops& ops = mla::ops_for(isa);
  const MlaPrefillPath path = mla_choose_prefill_path(p);
  mla::TokenSource src;
  src.kind = p.dtype == DType::kF32 ? mla::SourceKind::kF32 : mla::SourceKind::kBF16;
  src.base = static_cast<const std::uint8_t*>(p.kv);
  src.row_bytes = kMlaHeadDim * static_cast<std::int64_t>(dtype_size(p.dtype));
  const float sc = prefill_scale(p);

  // Units: (sequence, block of query tokens); sparse_gather uses one token a unit.
  struct Unit {
    int seq, t0, ntok;  // global query rows [t0, t0 + ntok)
  };
  const int tpu = path == MlaPrefillPath::kSparseGather ? 1 : std::max(1, kUnitRows / p.h_q);
  std::vector<Unit> units;
  for (int i = 0; i < p.b; ++i)
    for (int t = p.cu_seqlens[i]; t < p.cu_seqlens[i + 1]; t += tpu)
      units.push_back({i, t, std::min(tpu, p.cu_seqlens[i + 1] - t)});
  const int nu = static_cast<int>(units.size());

#pragma omp parallel num_threads(threads)
  {
    mla::Workspace ws;
    std::vector<float> lse;
    std::vector<std::int64_t> limit, list;
    std::vector<std::uint64_t> bits;
#pragma omp for schedule(dynamic, 1)
    for (int ui = 0; ui < nu; ++ui) {
      const Unit& un = units[ui];
      const int seq0 = p.cu_seqlens[un.seq];
      const int s_len = p.cu_seqlens[un.seq + 1] - seq0;
      const int R = un.ntok * p.h_q;
      ws.qbuf.resize(static_cast<std::size_t>(R) * kMlaHeadDim);
      mla::convert_to_f32(p.q, p.dtype, static_cast<std::int64_t>(un.t0) * p.h_q * kMlaHeadDim,
                          static_cast<std::int64_t>(R) * kMlaHeadDim, ws.qbuf.data());
      UnitSpec u;
      u.q = ws.qbuf.data();
      u.ntok = un.ntok;
      u.h_q = p.h_q;
      u.sc = sc;
      KeyList keys;
      keys.kind = KeyList::Kind::kContiguous;
      keys.base = seq0;
      limit.assign(un.ntok, 0);
      if (path == MlaPrefillPath::kSparseGather) {
        const std::int32_t* idx = p.indices + static_cast<std::int64_t>(un.t0) * p.topk;
        list.clear();
        for (int k = 0; k < p.topk; ++k)
          if (idx[k] >= 0) list.push_back(seq0 + idx[k]);
        keys.kind = KeyList::Kind::kList;
        keys.list = list.data();
        u.key_end = static_cast<std::int64_t>(list.size());
      } else if (path == MlaPrefillPath::kDenseCausal) {
        for (int t = 0; t < un.ntok; ++t) limit[t] = un.t0 + t - seq0 + 1;
        u.mask.kind = RowMask::Kind::kLimit;
        u.mask.limit = limit.data();
        u.key_end = limit[un.ntok - 1];
      } else {  // masked dense: bitmask of each token's selected keys
        const std::int64_t words = (s_len + 63) / 64;
        bits.assign(static_cast<std::size_t>(un.ntok) * words, 0);
        for (int t = 0; t < un.ntok; ++t) {
          const std::int32_t* idx = p.indices + static_cast<std::int64_t>(un.t0 + t) * p.topk;
          for (int k = 0; k < p.topk; ++k) {
            const std::int32_t j = idx[k];
            if (j < 0) continue;
            bits[t * words + (j >> 6)] |= std::uint64_t{1} << (j & 63);
            limit[t] = std::max<std::int64_t>(limit[t], j + 1);
          }
        }
        u.mask.kind = RowMask::Kind::kBits;
        u.mask.bits = bits.data();
        u.mask.words = words;
        u.mask.limit = limit.data();
        u.key_end = *std::max_element(limit.begin(), limit.end());
      }
      lse.resize(R);
      mla::run_unit(ops, src, keys, u, ws,
                    p.out + static_cast<std::int64_t>(un.t0) * p.h_q * kMlaValueDim, lse.data());
      if (p.lse != nullptr)
        for (int r = 0; r < R; ++r)
          p.lse[static_cast<std::int64_t>(r % p.h_q) * p.total + un.t0 + r / p.h_q] = lse[r];
    }
  }
}

void mla_sparse_prefill_reference(const MlaSparsePrefillParams& p, int threads) {
  const double sc = prefill_scale(p);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int t = 0; t < p.total; ++t) {
    int seq = 0;
    while (p.cu_seqlens[seq + 1] <= t) ++seq;
    const std::int64_t seq0 = p.cu_seqlens[seq];
    std::vector<std::int64_t> keys;
    const std::int32_t* idx = p.indices + static_cast<std::int64_t>(t) * p.topk;
    for (int k = 0; k < p.topk; ++k)
      if (idx[k] >= 0) keys.push_back(seq0 + idx[k]);
    const std::size_t n = keys.size();
    std::vector<double> kv(n * kMlaHeadDim), q(kMlaHeadDim), s(n), acc(kMlaValueDim);
    for (std::size_t j = 0; j < n; ++j)
      for (int c = 0; c < kMlaHeadDim; ++c)
        kv[j * kMlaHeadDim + c] = load_as_f32(p.kv, keys[j] * kMlaHeadDim + c, p.dtype);
    for (int h = 0; h < p.h_q; ++h) {
      const std::int64_t row = static_cast<std::int64_t>(t) * p.h_q + h;
      for (int c = 0; c < kMlaHeadDim; ++c) q[c] = load_as_f32(p.q, row * kMlaHeadDim + c, p.dtype);
      double mx = -std::numeric_limits<double>::infinity();
      for (std::size_t j = 0; j < n; ++j) {
        double dot = 0.0;
        for (int c = 0; c < kMlaHeadDim; ++c) dot += q[c] * kv[j * kMlaHeadDim + c];
        s[j] = dot * sc;
        mx = std::max(mx, s[j]);
      }
      double sum = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::size_t j = 0; j < n; ++j) {
        const double e = std::exp(s[j] - mx);
        sum += e;
        for (int c = 0; c < kMlaValueDim; ++c) acc[c] += e * kv[j * kMlaHeadDim + c];
      }
      for (int c = 0; c < kMlaValueDim; ++c)
        p.out[row * kMlaValueDim + c] = n == 0 ? 0.0f : static_cast<float>(acc[c] / sum);
      if (p.lse != nullptr)
        p.lse[static_cast<std::int64_t>(h) * p.total + t] =
            n == 0 ? -std::numeric_limits<float>::infinity()
                   : static_cast<float>(mx + std::log(sum));
    }
  }
}

}  // namespace ringattn::detail
