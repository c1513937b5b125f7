// MLA decode on the CPU (dense paged cache and sparse indices): scheduler plan,
// split-KV task loop and the merge of split partials.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mla/mla_internal.hpp"
#include "mla/mla_kernels.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"

namespace ringattn::detail {

namespace {

using mla::KeyList;
using mla::RowMask;
using mla::UnitSpec;
using mla::Workspace;

// A split is never shorter than this many keys (below it the merge costs more
// than the parallelism gains).
constexpr int kMinSplitKeys = 256;
// Query rows per unit: whole query tokens, about this many rows (all heads of a
// token always stay together so they share the cache reads).
constexpr int kUnitRows = 256;

// One decode problem: the query rows that share one key list.
//   dense:  sequence i, all s_q tokens, keys = its cache [0, L)
//   sparse: (sequence i, token s), keys = its valid indices (compacted): the first
//           topk_length[i] entries of the row (all topk without topk_length), minus
//           -1 padding and, with invalid_indices_as_padding, any slot out of range
struct Problem {
  int batch = 0;
  int tok0 = 0, ntok = 0;  // query tokens [tok0, tok0 + ntok) of the sequence
  std::int64_t nkeys = 0;
  std::vector<std::int64_t> list;  // sparse: slots
};

std::vector<Problem> make_problems(const MlaDecodeParams& p) {
  std::vector<Problem> probs;
  if (!p.is_sparse()) {
    probs.resize(p.b);
    for (int i = 0; i < p.b; ++i) {
      probs[i].batch = i;
      probs[i].ntok = p.s_q;
      probs[i].nkeys = p.cache_seqlens[i];
    }
    return probs;
  }
  const std::int64_t slots = static_cast<std::int64_t>(p.num_blocks) * p.page_size;
  probs.resize(static_cast<std::size_t>(p.b) * p.s_q);
  for (int i = 0; i < p.b; ++i) {
    const int used = p.topk_length != nullptr ? p.topk_length[i] : p.topk;
    for (int s = 0; s < p.s_q; ++s) {
      Problem& pr = probs[static_cast<std::size_t>(i) * p.s_q + s];
      pr.batch = i;
      pr.tok0 = s;
      pr.ntok = 1;
      const std::int32_t* idx = p.indices + (static_cast<std::int64_t>(i) * p.s_q + s) * p.topk;
      pr.list.reserve(used);
      for (int k = 0; k < used; ++k)
        if (idx[k] >= 0 && idx[k] < slots) pr.list.push_back(idx[k]);
      pr.nkeys = static_cast<std::int64_t>(pr.list.size());
    }
  }
  return probs;
}

int tokens_per_unit(int h_q) { return std::max(1, kUnitRows / h_q); }

// Splits per problem. Work of a problem = keys x query rows; aim at 4 units per
// thread overall (more chunks than threads, so uneven lengths still balance), never
// splitting below kMinSplitKeys keys. One thread: no splits.
std::vector<std::int32_t> plan_splits(const std::vector<Problem>& probs, int h_q, int threads) {
  std::vector<std::int32_t> splits(probs.size(), 1);
  if (threads <= 1) return splits;
  const int tpu = tokens_per_unit(h_q);
  double total = 0.0;
  for (const Problem& pr : probs) total += static_cast<double>(pr.nkeys) * pr.ntok;
  if (total <= 0.0) return splits;
  const double target = 4.0 * threads;
  for (std::size_t k = 0; k < probs.size(); ++k) {
    const Problem& pr = probs[k];
    const int chunks = (pr.ntok + tpu - 1) / tpu;
    const double share = target * static_cast<double>(pr.nkeys) * pr.ntok / total;
    const auto want = static_cast<std::int64_t>(std::ceil(share / chunks));
    const std::int64_t cap = std::max<std::int64_t>(1, pr.nkeys / kMinSplitKeys);
    splits[k] = static_cast<std::int32_t>(std::clamp<std::int64_t>(want, 1, cap));
  }
  return splits;
}

struct Task {
  int prob, tok0, ntok, split;
  std::int64_t k0, k1;
};

}  // namespace

SchedulerMetadata mla_plan_decode(const MlaDecodeParams& p, int threads) {
  const std::vector<Problem> probs = make_problems(p);
  SchedulerMetadata md;
  md.b = static_cast<int>(probs.size());
  md.threads = threads;
  md.num_splits = plan_splits(probs, p.h_q, threads);
  return md;
}

void mla_decode_cpu(const MlaDecodeParams& p, CpuIsa isa, int threads) {
  const mla::Ops& ops = mla::ops_for(isa);
  const bool bf16_path = mla::decode_uses_bf16_path(isa, p);
  const mla::TokenSource src = mla::make_source(p);
  std::vector<Problem> probs = make_problems(p);
  const int np = static_cast<int>(probs.size());

  std::vector<std::int32_t> splits;
  if (p.plan != nullptr) {
    splits = p.plan->num_splits;
  } else if (p.num_splits > 0) {
    splits.assign(np, p.num_splits);
  } else {
    splits = plan_splits(probs, p.h_q, threads);
  }

  // Tasks = problem x unit of query tokens x key split. Split boundaries are
  // multiples of the key tile; partials of a split problem go to `parts`
  // ([rows, splits, 512] per problem) and are merged afterwards.
  const int tpu = tokens_per_unit(p.h_q);
  std::vector<Task> tasks;
  std::vector<std::int64_t> part_off(np, -1);
  std::int64_t part_rows = 0;  // sum over split problems of rows * splits
  for (int k = 0; k < np; ++k) {
    const Problem& pr = probs[k];
    std::int64_t per = (pr.nkeys + splits[k] - 1) / std::max(1, splits[k]);
    per = std::max<std::int64_t>(mla::kTile, (per + mla::kTile - 1) / mla::kTile * mla::kTile);
    const int ns = pr.nkeys == 0 ? 1 : static_cast<int>((pr.nkeys + per - 1) / per);
    splits[k] = ns;
    if (ns > 1) {
      part_off[k] = part_rows;
      part_rows += static_cast<std::int64_t>(pr.ntok) * p.h_q * ns;
    }
    for (int t0 = 0; t0 < pr.ntok; t0 += tpu)
      for (int sp = 0; sp < ns; ++sp)
        tasks.push_back({k, t0, std::min(tpu, pr.ntok - t0), sp, sp * per,
                         std::min<std::int64_t>(pr.nkeys, (sp + 1) * per)});
  }
  std::vector<float> parts_o(static_cast<std::size_t>(part_rows) * kMlaValueDim);
  std::vector<float> parts_lse(static_cast<std::size_t>(part_rows));
  // Running maxima of the splits, only when the caller asked for max_logits.
  std::vector<float> parts_max(p.max_logits != nullptr ? static_cast<std::size_t>(part_rows) : 0);

  const float sc = mla::decode_score_scale(p);
  const float out_mul = p.bmm2_scale > 0.0f ? p.bmm2_scale : 1.0f;

  // Writes the final (o, lse, max) of `rows` consecutive rows of problem k, starting
  // at its row r0 (row r = token * h_q + head). This runs once per output row, after
  // any split merge, so the sink factor exp(lse) / (exp(lse) + exp(sink))
  // = 1 / (1 + exp(sink - lse)) is applied exactly once (docs/semantics.md section 7).
  // A row with LSE -inf has output 0 already and stays so.
  auto write_final = [&](int k, int r0, int rows, const float* o, const float* lse,
                         const float* mx) {
    const Problem& pr = probs[k];
    for (int r = r0; r < r0 + rows; ++r) {
      const int s = pr.tok0 + r / p.h_q, h = r % p.h_q;
      const std::int64_t orow = (static_cast<std::int64_t>(pr.batch) * p.s_q + s) * p.h_q + h;
      const float* src_o = o + static_cast<std::int64_t>(r - r0) * kMlaValueDim;
      const float row_lse = lse[r - r0];
      float mul = out_mul;
      if (p.sinks != nullptr && row_lse != kNegInf) mul *= sink_scale(row_lse, p.sinks[h]);
      for (int c = 0; c < kMlaValueDim; ++c)
        store_from_f32(p.out, orow * kMlaValueDim + c, p.out_dtype, src_o[c] * mul);
      if (p.lse != nullptr)
        p.lse[(static_cast<std::int64_t>(pr.batch) * p.h_q + h) * p.s_q + s] = row_lse;
      if (p.max_logits != nullptr) p.max_logits[orow] = mx[r - r0];
    }
  };

  const int nt = static_cast<int>(tasks.size());
#pragma omp parallel num_threads(threads)
  {
    Workspace ws;
    std::vector<float> o, lse, mx;
    std::vector<std::int64_t> limit;
#pragma omp for schedule(dynamic, 1)
    for (int ti = 0; ti < nt; ++ti) {
      const Task& task = tasks[ti];
      const Problem& pr = probs[task.prob];
      const int R = task.ntok * p.h_q;
      const std::int64_t q_off =
          ((static_cast<std::int64_t>(pr.batch) * p.s_q + pr.tok0 + task.tok0) * p.h_q) *
          kMlaHeadDim;
      ws.qbuf.resize(static_cast<std::size_t>(R) * kMlaHeadDim);
      mla::convert_to_f32(p.q, p.q_dtype, q_off, static_cast<std::int64_t>(R) * kMlaHeadDim,
                          ws.qbuf.data());

      KeyList keys;
      if (p.is_sparse()) {
        keys.kind = KeyList::Kind::kList;
        keys.list = pr.list.data();
      } else {
        keys.kind = KeyList::Kind::kPaged;
        keys.block_table = p.block_table + static_cast<std::int64_t>(pr.batch) * p.max_blocks;
        keys.page_size = p.page_size;
      }
      UnitSpec u;
      u.q = ws.qbuf.data();
      u.ntok = task.ntok;
      u.h_q = p.h_q;
      u.key_begin = task.k0;
      u.key_end = task.k1;
      u.sc = sc;
      if (!p.is_sparse() && p.causal) {
        // Bottom-right causal: query token s sees cache positions j <= L - s_q + s.
        limit.resize(task.ntok);
        for (int t = 0; t < task.ntok; ++t) limit[t] = pr.nkeys - p.s_q + (task.tok0 + t) + 1;
        u.mask.kind = RowMask::Kind::kLimit;
        u.mask.limit = limit.data();
      }
      o.resize(static_cast<std::size_t>(R) * kMlaValueDim);
      lse.resize(R);
      mx.resize(R);
      float* const mxp = p.max_logits != nullptr ? mx.data() : nullptr;
      if (bf16_path && isa == CpuIsa::kAmx)
        mla::run_unit_amx(src, keys, u, ws, o.data(), lse.data(), mxp);
      else if (bf16_path)
        mla::run_unit_dpbf16(src, keys, u, ws, o.data(), lse.data(), mxp);
      else
        mla::run_unit(ops, src, keys, u, ws, o.data(), lse.data(), mxp);

      const int r0 = task.tok0 * p.h_q;
      if (part_off[task.prob] < 0) {
        write_final(task.prob, r0, R, o.data(), lse.data(), mx.data());
      } else {
        const int ns = splits[task.prob];
        for (int r = 0; r < R; ++r) {
          const std::int64_t pi =
              part_off[task.prob] + static_cast<std::int64_t>(r0 + r) * ns + task.split;
          std::copy_n(o.data() + static_cast<std::int64_t>(r) * kMlaValueDim, kMlaValueDim,
                      parts_o.data() + pi * kMlaValueDim);
          parts_lse[pi] = lse[r];
          if (p.max_logits != nullptr) parts_max[pi] = mx[r];
        }
      }
    }

    // Split-KV reduction with the one public merge (docs/semantics.md section 5).
    std::vector<float> mo(static_cast<std::size_t>(kMlaValueDim));
    float ml = 0.0f;
#pragma omp for schedule(dynamic, 4)
    for (int k = 0; k < np; ++k) {
      if (part_off[k] < 0) continue;
      const int rows = probs[k].ntok * p.h_q;
      for (int r = 0; r < rows; ++r) {
        const std::int64_t pi = part_off[k] + static_cast<std::int64_t>(r) * splits[k];
        merge_states(parts_o.data() + pi * kMlaValueDim, parts_lse.data() + pi, mo.data(), &ml, 1,
                     splits[k], kMlaValueDim);
        float mxv = kNegInf;
        if (p.max_logits != nullptr)
          for (int sp = 0; sp < splits[k]; ++sp) mxv = std::max(mxv, parts_max[pi + sp]);
        write_final(k, r, 1, mo.data(), &ml, &mxv);
      }
    }
  }
}

}  // namespace ringattn::detail
