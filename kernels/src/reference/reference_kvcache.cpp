// Reference KV-cache forward (docs/semantics.md section 3) and its split plan, plain loops.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvcache_prepare.hpp"
#include "reference/reference_attention.hpp"
#include "reference/reference_kernels.hpp"

namespace ringattn::detail {

SchedulerMetadata reference_plan_kvcache(const KvCacheParams& p, int threads) {
  SchedulerMetadata plan;
  plan.b = p.b;
  plan.threads = threads;
  plan.num_splits.assign(static_cast<std::size_t>(p.b), 1);
  // An explicit request wins; otherwise split only when (sequence, head) items are
  // too few to occupy the threads, keeping at least 256 keys per split.
  const std::int64_t items = std::int64_t{p.b} * p.h * std::max(p.s_q, 1);
  for (int i = 0; i < p.b; ++i) {
    std::int64_t n = 1;
    if (p.num_splits > 0) {
      n = p.num_splits;
    } else if (items < threads) {
      const std::int64_t by_threads = (threads + items - 1) / items;
      const std::int64_t by_keys = std::max<std::int64_t>(kv_num_keys(p, i) / 256, 1);
      n = std::min(by_threads, by_keys);
    }
    plan.num_splits[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(n);
  }
  return plan;
}

void reference_forward_kvcache(const KvCacheParams& p, int threads) {
  // 1. Append the new keys/values (rotary on k_new) so they are attended below.
  kvcache_append(p, threads);
  const std::int64_t work = kv_total_q(p) * p.h;
  if (work == 0) return;
  // 2. Rotated copy of q in its own dtype (what FA does: q is rotated and rounded
  //    to its storage type before the scores), contiguous [total_q, h, d].
  std::vector<char> q_buf(static_cast<std::size_t>(work * p.d) * dtype_size(p.dtype));
  kvcache_prepare_q(p, q_buf.data(), p.dtype, threads);

  const int group = p.h / p.h_k;
  const ScoreFn score = ScoreFn::make(p.mask, p.qv ? p.d + p.d_v : p.d);
  // 3. One work item per (sequence, query row, query head), each computed over its
  //    key splits (plan, or p.num_splits, or one) and merged (merge_states).
#pragma omp parallel num_threads(threads)
  {
    RowScratch scratch;
    scratch.q.resize(static_cast<std::size_t>(p.d));
    scratch.qv.resize(static_cast<std::size_t>(p.d_v));
#pragma omp for schedule(dynamic, 4)
    for (std::int64_t w = 0; w < work; ++w) {
      const int hi = static_cast<int>(w % p.h);
      const std::int64_t g = w / p.h;  // query row among all rows
      const int i = kv_seq_of_row(p, g);
      const std::int64_t r = g - kv_q_row0(p, i);
      const int hk = hi / group;
      // fp8: q_descale * k_descale on the query row, v_descale on the output.
      const RowDescale ds = RowDescale::make(p.descale, i, hk);
      for (int c = 0; c < p.d; ++c) {
        scratch.q[static_cast<std::size_t>(c)] =
            load_as_f32(q_buf.data(), w * p.d + c, p.dtype) * ds.qk;
      }
      if (p.qv) {  // qv is not rotated: read in place
        const std::int64_t qv_off = kv_qv_offset(p, i, r) + hi * p.qv_head_stride;
        for (int c = 0; c < p.d_v; ++c)
          scratch.qv[static_cast<std::size_t>(c)] = load_as_f32(p.qv, qv_off + c, p.dtype);
      }
      int splits = p.num_splits > 1 ? p.num_splits : 1;
      if (p.plan) splits = p.plan->num_splits[static_cast<std::size_t>(i)];
      const RowMask mask = RowMask::make(p.mask, i, kv_s_q(p, i), kv_num_keys(p, i));
      auto k_row = [&](std::int64_t t) { return kv_k_row(p, i, t, hk); };
      auto v_row = [&](std::int64_t t) { return kv_v_row(p, i, t, hk); };
      const float lse = attend_row(scratch.q.data(), p.qv ? scratch.qv.data() : nullptr, p.d, p.d_v,
                                   p.dtype, r, mask, score, splits, k_row, v_row, scratch);
      for (float& x : scratch.o) x *= ds.v;
      // The sink scales the merged row once (attention_params.hpp).
      if (p.mask.sinks) apply_sinks(scratch.o.data(), 0, &lse, 0, p.mask.sinks + hi, 1, 1, p.d_v);
      store_row(p.out, kv_out_offset(p, i, r) + hi * p.out_head_stride, p.out_dtype,
                scratch.o.data(), p.d_v);
      if (p.lse) p.lse[kv_lse_index(p, i, r, hi)] = lse;
    }
  }
}

}  // namespace ringattn::detail
