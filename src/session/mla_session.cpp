// MLA decode over a sharded latent cache that lives across calls (mla_session.hpp).
#include "ringattn/mla_session.hpp"

#include <mpi.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "ring/ring_blocks.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/version.hpp"
#include "session/session_records.hpp"

namespace ringattn {

namespace {

std::string str(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

// Collective checks of an MLA session's config; returns the cache's config (one "KV
// head" of 576 values, no separate V: the value is the latent's first 512).
SessionConfig validated(const comm::Communicator& comm, const MlaSessionConfig& c) {
  comm::run_collectively(comm, [&] {
    RA_CHECK_ARG_GT(c.b, 0, "mla session: batch size b");
    RA_CHECK_ARG(
        c.h_q >= 1 && c.h_q <= kMlaMaxHeads,
        "mla session: query heads h_q = " << c.h_q << " outside [1, " << kMlaMaxHeads << "]");
    RA_CHECK(c.q_dtype == DType::kF32 || c.q_dtype == DType::kBF16, UnsupportedError,
             "mla session: q dtype " << dtype_name(c.q_dtype) << " not supported (fp32, bf16)");
    RA_CHECK(c.kv_dtype == DType::kF32 || c.kv_dtype == DType::kBF16, UnsupportedError,
             "mla session: latent cache dtype " << dtype_name(c.kv_dtype)
                                                << " not supported (fp32, bf16)");
    RA_CHECK_ARG_GE(c.page_size, 1, "mla session: page_size");
    RA_CHECK_ARG_GE(c.capacity, 1, "mla session: capacity");
    RA_CHECK_ARG(std::isfinite(c.scale) && c.scale >= 0.0f,
                 "mla session: scale " << c.scale << " must be finite and >= 0 (0 = 1/sqrt(576))");
    if (c.sinks)
      for (int h = 0; h < c.h_q; ++h)
        RA_CHECK_ARG(!std::isnan(c.sinks[h]),
                     "mla session: sinks[" << h << "]: NaN (use -inf for a head without a sink)");
  });
  comm::check_consistent(comm, {{"version", version()},
                                {"mla q dtype", dtype_name(c.q_dtype)},
                                {"mla kv dtype", dtype_name(c.kv_dtype)},
                                {"mla batch", str(c.b)},
                                {"mla heads", str(c.h_q)},
                                {"mla page size", str(c.page_size)},
                                {"mla capacity", str(double(c.capacity))},
                                {"mla cache layout", cache_layout_name(c.layout)},
                                {"mla prompt layout", layout_name(c.prompt_layout)},
                                {"mla scale", str(c.scale)},
                                {"mla sinks", detail::sinks_fingerprint(c.sinks, c.h_q)}});
  SessionConfig s;
  s.dtype = c.kv_dtype;
  s.b = c.b;
  s.h = c.h_q;
  s.h_k = 1;
  s.d = kMlaHeadDim;
  s.d_v = 0;  // no V storage
  s.page_size = c.page_size;
  s.capacity = c.capacity;
  s.layout = c.layout;
  s.prefill_layout = c.prompt_layout;
  return s;
}

}  // namespace

MlaSession::MlaSession(const comm::Communicator& comm, const Engine& engine,
                       const MlaSessionConfig& config)
    : comm_(comm),
      engine_(engine),
      config_(config),
      cache_(validated(comm, config), comm.size(), comm.rank()) {}

std::vector<std::int64_t> MlaSession::prefill_positions(std::int64_t len) const {
  return shard_positions(config_.prompt_layout, len, comm_.size(), comm_.rank());
}

StepStats MlaSession::prefill(const std::vector<std::int64_t>& prompt_lens, const void* kv) {
  const double t0 = detail::ring_now_s();
  comm::run_collectively(comm_, [&] {
    RA_CHECK_ARG_EQ(static_cast<int>(prompt_lens.size()), config_.b,
                    "mla session prefill: prompt lengths");
    for (int s = 0; s < config_.b; ++s) {
      RA_CHECK_ARG_GE(prompt_lens[static_cast<std::size_t>(s)], 0,
                      "mla session prefill: prompt length");
      cache_.check_room(s, prompt_lens[static_cast<std::size_t>(s)]);
      RA_CHECK_ARG(cache_.length(s) == 0, "mla session prefill: sequence "
                                              << s << " already holds " << cache_.length(s)
                                              << " tokens; prefill starts a session");
    }
  });
  std::string lens_joined;
  for (auto l : prompt_lens) lens_joined += std::to_string(l) + ",";
  comm::check_consistent(comm_, {{"prompt lengths", lens_joined}});
  const std::size_t row = kMlaHeadDim * dtype_size(config_.kv_dtype);
  std::size_t offset = 0;
  for (int s = 0; s < config_.b; ++s) {
    cache_.begin(s, prompt_lens[static_cast<std::size_t>(s)]);
    const std::int64_t n = cache_.local_count(s, cache_.length(s));
    if (n > 0)  // (a rank without rows may pass a null tensor)
      std::memcpy(cache_.k_row(s, 0), static_cast<const std::byte*>(kv) + offset,
                  static_cast<std::size_t>(n) * row);
    offset += static_cast<std::size_t>(n) * row;
  }
  StepStats st;
  st.total_s = detail::ring_now_s() - t0;
  return st;
}

StepStats MlaSession::decode(int s_q, const void* q, const void* kv, float* out, float* lse,
                             int root) {
  const MlaSessionConfig& c = config_;
  const double t0 = detail::ring_now_s();
  comm::run_collectively(comm_, [&] {
    RA_CHECK_ARG(s_q >= 1 && s_q <= kMlaMaxQueryTokens,
                 "mla session decode: new tokens s_q = " << s_q << " outside [1, "
                                                         << kMlaMaxQueryTokens << "]");
    RA_CHECK_ARG(root >= -1 && root < comm_.size(),
                 "mla session decode: root " << root << " outside [-1, " << comm_.size() << ")");
    RA_CHECK_ARG(q && kv, "mla session decode: q and kv must be non-null");
    RA_CHECK_ARG(out || (root >= 0 && comm_.rank() != root),
                 "mla session decode: out must be non-null");
    for (int s = 0; s < c.b; ++s) cache_.check_room(s, s_q);
  });
  comm::check_consistent(
      comm_, {{"mla new tokens", std::to_string(s_q)}, {"mla root", std::to_string(root)}});
  StepStats st;
  const int dv = kMlaValueDim;
  const std::int64_t rows = std::int64_t{c.b} * s_q * c.h_q;
  Scratch& w = scratch_;
  w.out.resize(static_cast<std::size_t>(rows * dv));
  w.lse.resize(static_cast<std::size_t>(rows));
  // History: every new row sees all of this rank's cached latents (they precede it), so
  // no mask: one kernel call over the local paged cache.
  const double tc = detail::ring_now_s();
  w.seqlens.resize(static_cast<std::size_t>(c.b));
  for (int s = 0; s < c.b; ++s)
    w.seqlens[static_cast<std::size_t>(s)] =
        static_cast<std::int32_t>(cache_.local_count(s, cache_.length(s)));
  MlaDecodeParams p;
  p.q_dtype = c.q_dtype;
  p.kv_dtype = c.kv_dtype;
  p.out_dtype = DType::kF32;
  p.q = q;
  p.kv_cache = cache_.k_cache();
  p.out = w.out.data();
  p.lse = w.lse.data();
  p.b = c.b;
  p.s_q = s_q;
  p.h_q = c.h_q;
  p.num_blocks = c.b * cache_.pages_per_seq();
  p.page_size = cache_.page_size();
  p.max_blocks = cache_.pages_per_seq();
  p.block_table = cache_.page_table().data();
  p.cache_seqlens = w.seqlens.data();
  p.scale = c.scale;
  p.causal = false;
  engine_.mla_decode(p);
  detail::kernel_to_records(w.out.data(), w.lse.data(), c.b, s_q, c.h_q, dv, w.records);
  // The step's own tokens on rank 0: kv [b, s_q, 576] is a paged cache of b blocks of
  // s_q tokens, and the kernel's causal rule over it (row s sees positions <= s) is the
  // causal rule among the new tokens.
  if (comm_.rank() == 0) {
    w.new_table.resize(static_cast<std::size_t>(c.b));
    w.new_lens.assign(static_cast<std::size_t>(c.b), s_q);
    for (int s = 0; s < c.b; ++s) w.new_table[static_cast<std::size_t>(s)] = s;
    MlaDecodeParams n = p;
    n.kv_cache = kv;
    n.num_blocks = c.b;
    n.page_size = s_q;
    n.max_blocks = 1;
    n.block_table = w.new_table.data();
    n.cache_seqlens = w.new_lens.data();
    n.causal = true;
    engine_.mla_decode(n);
    detail::kernel_to_records(w.out.data(), w.lse.data(), c.b, s_q, c.h_q, dv, w.fresh);
    detail::merge_records_into(w.records, w.fresh, dv);
  }
  st.compute_s = detail::ring_now_s() - tc;
  // The new latents on their owners.
  const std::size_t row = kMlaHeadDim * dtype_size(c.kv_dtype);
  for (int s = 0; s < c.b; ++s) {
    const std::int64_t base = cache_.length(s);
    cache_.grow(s, s_q);
    for (int i = 0; i < s_q; ++i) {
      if (cache_.owner(s, base + i) != comm_.rank()) continue;
      std::memcpy(cache_.k_row(s, cache_.local_count(s, base + i)),
                  static_cast<const std::byte*>(kv) + (std::int64_t{s} * s_q + i) * row, row);
    }
  }
  // One reduction of the packed records [b, s_q, h_q][513] with the LSE merge as the MPI
  // operation; timed as KvSession::decode (StepStats).
  st.local_s = detail::ring_now_s() - t0;
  if (merge_after_barrier_) comm_.barrier();
  const double tr = detail::ring_now_s();
  merge_across_ranks(comm_, w.records.data(), rows, dv, root);
  st.reduce_s = detail::ring_now_s() - tr;
  st.bytes = static_cast<double>(rows) * (dv + 1) * 4.0;
  if (root < 0 || comm_.rank() == root) {
    // Sinks (docs/semantics.md section 7): once, on the merged rows.
    apply_sinks(w.records.data(), dv + 1, w.records.data() + dv, dv + 1, c.sinks, rows, c.h_q, dv);
    detail::from_records(w.records, c.b, s_q, c.h_q, dv, out, lse);
  }
  detail::finish_decode_stats(comm_, tr - t0, detail::ring_now_s() - t0, st);
  return st;
}

}  // namespace ringattn
