// Reference dense and varlen forward (docs/semantics.md sections 1-2), plain loops.
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "progress_throttle.hpp"
#include "reference/reference_attention.hpp"
#include "reference/reference_kernels.hpp"

namespace ringattn::detail {

void reference_forward(const FwdParams& p, int threads) {
  const bool varlen = p.is_varlen();
  // "Row slots": every query row of the whole batch, numbered r = 0 .. rows-1.
  // Dense: r = batch * s_q + i. Varlen: r is the packed row index in [0, total_q).
  const std::int64_t rows =
      varlen ? static_cast<std::int64_t>(p.cu_seqlens_q[p.b]) : std::int64_t{p.b} * p.s_q;
  const std::int64_t total_q = varlen ? rows : 0;
  const std::int64_t work = rows * p.h;
  if (work == 0) return;
  const int group = p.h / p.h_k;
  const ScoreFn score = ScoreFn::make(p.mask, p.qv ? p.d + p.d_v : p.d);
  const int requested_splits = p.num_splits > 1 ? p.num_splits : 1;

  // One work item per (query row, query head); rows of different lengths make the
  // cost uneven, hence the dynamic schedule.
  ProgressThrottle progress(p.progress);
#pragma omp parallel num_threads(threads)
  {
    RowScratch scratch;
    scratch.q.resize(static_cast<std::size_t>(p.d));
    scratch.qv.resize(static_cast<std::size_t>(p.d_v));
    const bool caller = omp_get_thread_num() == 0;  // polls the progress hook
#pragma omp for schedule(dynamic, 16)
    for (std::int64_t w = 0; w < work; ++w) {
      if (caller) progress.poll();
      const std::int64_t r = w / p.h;
      const int hi = static_cast<int>(w % p.h);
      const int hk = hi / group;

      int bi;
      std::int64_t i;  // row within its batch element
      std::int64_t s_q_b, s_k_b;
      std::int64_t q_off, qv_off, k_base, v_base, out_off, lse_idx;
      if (varlen) {
        bi = static_cast<int>(std::upper_bound(p.cu_seqlens_q, p.cu_seqlens_q + p.b + 1, r) -
                              p.cu_seqlens_q - 1);
        i = r - p.cu_seqlens_q[bi];
        s_q_b = p.seqused_q ? p.seqused_q[bi] : p.cu_seqlens_q[bi + 1] - p.cu_seqlens_q[bi];
        s_k_b = p.seqused_k ? p.seqused_k[bi] : p.cu_seqlens_k[bi + 1] - p.cu_seqlens_k[bi];
        q_off = r * p.q_row_stride + hi * p.q_head_stride;
        qv_off = r * p.qv_row_stride + hi * p.qv_head_stride;
        k_base = std::int64_t{p.cu_seqlens_k[bi]} * p.k_row_stride + hk * p.k_head_stride;
        v_base = std::int64_t{p.cu_seqlens_k[bi]} * p.v_row_stride + hk * p.v_head_stride;
        out_off = r * p.out_row_stride + hi * p.out_head_stride;
        lse_idx = hi * total_q + r;
      } else {
        bi = static_cast<int>(r / p.s_q);
        i = r % p.s_q;
        s_q_b = p.seqused_q ? p.seqused_q[bi] : p.s_q;
        s_k_b = p.seqused_k ? p.seqused_k[bi] : p.s_k;
        q_off = bi * p.q_batch_stride + i * p.q_row_stride + hi * p.q_head_stride;
        qv_off = bi * p.qv_batch_stride + i * p.qv_row_stride + hi * p.qv_head_stride;
        k_base = bi * p.k_batch_stride + hk * p.k_head_stride;
        v_base = bi * p.v_batch_stride + hk * p.v_head_stride;
        out_off = bi * p.out_batch_stride + i * p.out_row_stride + hi * p.out_head_stride;
        lse_idx = (std::int64_t{bi} * p.h + hi) * p.s_q + i;
      }

      float lse = kNegInf;
      scratch.o.assign(static_cast<std::size_t>(p.d_v), 0.0f);
      // Rows past seqused_q are not part of the problem: FA3 leaves them unwritten,
      // we write output 0 and LSE -inf so that no caller ever reads garbage.
      if (i < s_q_b) {
        // fp8: q_descale * k_descale on the query row, v_descale on the output.
        const RowDescale ds = RowDescale::make(p.descale, bi, hk);
        for (int c = 0; c < p.d; ++c)
          scratch.q[static_cast<std::size_t>(c)] = load_as_f32(p.q, q_off + c, p.dtype) * ds.qk;
        for (int c = 0; p.qv && c < p.d_v; ++c)
          scratch.qv[static_cast<std::size_t>(c)] = load_as_f32(p.qv, qv_off + c, p.dtype);
        const RowMask mask = RowMask::make(p.mask, bi, s_q_b, s_k_b);
        auto k_row = [&](std::int64_t j) {
          return element_ptr(p.k, k_base + j * p.k_row_stride, p.dtype);
        };
        auto v_row = [&](std::int64_t j) {
          return element_ptr(p.v, v_base + j * p.v_row_stride, p.dtype);
        };
        lse = attend_row(scratch.q.data(), p.qv ? scratch.qv.data() : nullptr, p.d, p.d_v, p.dtype,
                         i, mask, score, requested_splits, k_row, v_row, scratch);
        for (float& x : scratch.o) x *= ds.v;
        // The sink scales the merged row once (attention_params.hpp).
        if (p.mask.sinks) apply_sinks(scratch.o.data(), 0, &lse, 0, p.mask.sinks + hi, 1, 1, p.d_v);
      }
      store_row(p.out, out_off, p.out_dtype, scratch.o.data(), p.d_v);
      if (p.lse) p.lse[lse_idx] = lse;
    }
  }
}

}  // namespace ringattn::detail
