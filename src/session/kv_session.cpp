// Prefill, decode steps and extend over the sharded KV cache (kv_session.hpp).
#include "ringattn/kv_session.hpp"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <sstream>

#include "ring/ring_blocks.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/comm/ring_exchange.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/softmax_state.hpp"
#include "ringattn/version.hpp"
#include "session/session_records.hpp"

namespace ringattn {

using detail::clear_records;
using detail::from_records;
using detail::merge_records_into;

namespace {

double max_over_ranks(const comm::Communicator& comm, double x) {
  double y = x;
  MPI_Allreduce(&x, &y, 1, MPI_DOUBLE, MPI_MAX, comm.get());
  return y;
}

// Position of the first key that the row at position `pos` may see: 0, or the start of
// its left window, or of its attention chunk (docs/semantics.md sections 1 and 7).
std::int64_t first_visible_pos(const MaskParams& m, std::int64_t pos) {
  std::int64_t first = 0;
  if (m.window_left >= 0) first = std::max(first, pos - m.window_left);
  if (m.attention_chunk > 0) first = std::max(first, pos / m.attention_chunk * m.attention_chunk);
  return first;
}

std::string str(double x) {
  std::ostringstream os;
  os << x;
  return os.str();
}

}  // namespace

const char* extend_mode_name(ExtendMode mode) {
  switch (mode) {
    case ExtendMode::kPassQ:
      return "pass-q";
    case ExtendMode::kPassKV:
      return "pass-kv";
    default:
      return "auto";
  }
}

ExtendMode parse_extend_mode(std::string_view name) {
  if (name == "auto") return ExtendMode::kAuto;
  if (name == "pass-q") return ExtendMode::kPassQ;
  if (name == "pass-kv") return ExtendMode::kPassKV;
  RA_THROW(InvalidArgument,
           "extend mode: unknown mode '" << name << "' (expected auto, pass-q or pass-kv)");
}

// Cost model of one extend, per rank. Compute of `rows` query rows per sequence against
// `keys` cached keys: the larger of its FLOPs at the kernel rate (lower for calls with
// few rows per K/V head) and the read of those keys from memory:
//   rate(rows) = flops_per_s * min(1, rows * h / h_k / full_rate_rows)
//   compute(rows, keys) = max(2 b rows keys h (d + d_v) / rate(rows),
//                             b keys h_k (d + d_v) e / memory_bytes_per_s)
//   pass-Q   compute(S1, C / P), then a tree merge of the records [b, S1, h][d_v + 1]
//            fp32: 2 log2(P) messages of that size (reduce and broadcast phases).
//   pass-KV  P steps of compute(S1 / P, C / P), each overlapped with the transfer of the
//            next context shard (b C / P h_k (d + d_v) e bytes): max of the two per step;
//            then one allgather of the finished, disjoint record slices.
// The faster prediction runs; `why` prints both.
ExtendPlan plan_extend(const SessionConfig& c, int ranks, std::int64_t context, std::int64_t s1,
                       ExtendMode requested, const CostConstants& k) {
  ExtendPlan plan;
  const double P = ranks, e = static_cast<double>(dtype_size(c.dtype));
  const double rounds = ranks > 1 ? 2.0 * std::ceil(std::log2(P)) : 0.0;
  const double records = double(c.b) * s1 * c.h * (c.d_v + 1) * 4.0;
  const double keys = std::ceil(context / P);
  const double shard = double(c.b) * keys * c.h_k * (c.d + c.d_v) * e;
  const auto compute = [&](double rows) {
    const double rows_per_kv_head = rows * c.h / c.h_k;
    const double rate = k.flops_per_s * std::min(1.0, rows_per_kv_head / k.full_rate_rows);
    return std::max(2.0 * c.b * rows * keys * c.h * (c.d + c.d_v) / rate,
                    shard / k.memory_bytes_per_s);
  };
  const double transfer = shard / k.bytes_per_s + k.latency_s;
  const double gather = records * (P - 1) / P;
  plan.pass_q_bytes = rounds * records;
  plan.pass_kv_bytes = (P - 1) * shard + gather;
  plan.pass_q_s = compute(double(s1)) + rounds * (records / k.bytes_per_s + k.latency_s);
  const double step = compute(std::ceil(s1 / P));
  plan.pass_kv_s = step + (P - 1) * std::max(step, transfer) + gather / k.bytes_per_s +
                   (ranks > 1 ? (P - 1) * k.latency_s : 0.0);
  std::ostringstream why;
  why << "predicted: pass-q " << plan.pass_q_s * 1e3 << " ms (" << plan.pass_q_bytes / 1e6
      << " MB sent), pass-kv " << plan.pass_kv_s * 1e3 << " ms (" << plan.pass_kv_bytes / 1e6
      << " MB sent, " << step * 1e3 << " ms compute vs " << transfer * 1e3
      << " ms transfer per step)";
  if (requested == ExtendMode::kAuto) {
    plan.mode = plan.pass_kv_s < plan.pass_q_s ? ExtendMode::kPassKV : ExtendMode::kPassQ;
    why << "; auto picks " << extend_mode_name(plan.mode);
  } else {
    plan.mode = requested;
    why << "; " << extend_mode_name(requested) << " forced";
  }
  plan.why = why.str();
  return plan;
}

namespace {

// Collective checks of a session's config; returns it.
const SessionConfig& validated(const comm::Communicator& comm, const SessionConfig& c) {
  comm::run_collectively(comm, [&] {
    RA_CHECK_ARG_GT(c.b, 0, "session: batch size b");
    RA_CHECK_ARG(c.h > 0 && c.h_k > 0 && c.h % c.h_k == 0,
                 "session: heads h = " << c.h << " must be a positive multiple of h_k = " << c.h_k);
    RA_CHECK_ARG(c.d > 0 && c.d <= kMaxHeadDim && c.d_v > 0 && c.d_v <= kMaxHeadDim,
                 "session: head dims d = " << c.d << ", d_v = " << c.d_v << " must be in [1, "
                                           << kMaxHeadDim << "]");
    RA_CHECK(c.dtype == DType::kF32 || c.dtype == DType::kBF16 || c.dtype == DType::kF16,
             UnsupportedError,
             "session: dtype " << dtype_name(c.dtype) << " not supported (fp32, bf16, fp16)");
    RA_CHECK_ARG_GE(c.page_size, 1, "session: page_size");
    RA_CHECK_ARG_GE(c.capacity, 1, "session: capacity");
    RA_CHECK_ARG(c.mask.window_left >= -1,
                 "session: window left " << c.mask.window_left << " must be >= -1");
    RA_CHECK_ARG(c.mask.window_right == -1 || c.mask.window_right == 0,
                 "session: window right must be 0 or -1 (the session is causal), got "
                     << c.mask.window_right);
    RA_CHECK(c.mask.mask_shift == nullptr, UnsupportedError,
             "session: mask.mask_shift must be nullptr");
    RA_CHECK(
        c.mask.chunk_q_pos == nullptr && c.mask.chunk_k_pos == nullptr && c.mask.chunk_stride == 1,
        UnsupportedError,
        "session: mask.chunk_q_pos / chunk_k_pos / chunk_stride must stay nullptr, nullptr, "
        "1 (attention_chunk alone selects chunked attention)");
    validate_mask(c.mask, c.h);
  });
  comm::check_consistent(comm,
                         {{"version", version()},
                          {"dtype", dtype_name(c.dtype)},
                          {"batch", str(c.b)},
                          {"heads", str(c.h) + "/" + str(c.h_k)},
                          {"head dims", str(c.d) + "/" + str(c.d_v)},
                          {"page size", str(c.page_size)},
                          {"capacity", str(double(c.capacity))},
                          {"cache layout", cache_layout_name(c.layout)},
                          {"prefill layout", layout_name(c.prefill_layout)},
                          {"mask", str(c.mask.scale) + "," + str(c.mask.softcap) + "," +
                                       str(c.mask.window_left) + "," + str(c.mask.attention_chunk)},
                          {"sinks", detail::sinks_fingerprint(c.mask.sinks, c.h)}});
  return c;
}

}  // namespace

KvSession::KvSession(const comm::Communicator& comm, const Engine& engine,
                     const SessionConfig& config)
    : comm_(comm), engine_(engine), cache_(validated(comm, config), comm.size(), comm.rank()) {}

std::vector<std::int64_t> KvSession::prefill_positions(std::int64_t len) const {
  return shard_positions(cache_.config().prefill_layout, len, comm_.size(), comm_.rank());
}

StepStats KvSession::prefill(const std::vector<std::int64_t>& prompt_lens, const void* q,
                             const void* k, const void* v, float* out, float* lse, bool attend) {
  const SessionConfig& c = cache_.config();
  const double t0 = detail::ring_now_s();
  comm::run_collectively(comm_, [&] {
    RA_CHECK_ARG_EQ(static_cast<int>(prompt_lens.size()), c.b, "session prefill: prompt lengths");
    for (int s = 0; s < c.b; ++s) {
      RA_CHECK_ARG_GE(prompt_lens[static_cast<std::size_t>(s)], 0,
                      "session prefill: prompt length");
      cache_.check_room(s, prompt_lens[static_cast<std::size_t>(s)]);
    }
  });
  std::string lens_joined;
  for (auto l : prompt_lens) lens_joined += std::to_string(l) + ",";
  comm::check_consistent(comm_, {{"prompt lengths", lens_joined}});

  const std::size_t es = dtype_size(c.dtype);
  const std::int64_t qr = std::int64_t{c.h} * c.d, kr = std::int64_t{c.h_k} * c.d,
                     vr = std::int64_t{c.h_k} * c.d_v;
  std::int64_t t_r = 0;
  for (int s = 0; s < c.b; ++s)
    t_r += shard_length(c.prefill_layout, prompt_lens[static_cast<std::size_t>(s)], comm_.size(),
                        comm_.rank());
  StepStats st;
  std::int64_t row = 0;
  std::vector<float> lse_s;
  for (int s = 0; s < c.b; ++s) {
    const std::int64_t len = prompt_lens[static_cast<std::size_t>(s)];
    cache_.begin(s, len);
    const std::int64_t n = cache_.local_count(s, len);
    // This rank's K/V rows go straight into its cache; the ring reads them there.
    if (n > 0) {  // (a rank without rows may pass null tensors)
      std::memcpy(cache_.k_row(s, 0), static_cast<const std::byte*>(k) + row * kr * es,
                  static_cast<std::size_t>(n * kr) * es);
      std::memcpy(cache_.v_row(s, 0), static_cast<const std::byte*>(v) + row * vr * es,
                  static_cast<std::size_t>(n * vr) * es);
    }
    if (len > 0 && attend) {
      const std::int32_t cu[2] = {0, static_cast<std::int32_t>(len)};
      RingAttentionParams p;
      p.dtype = c.dtype;
      p.q = static_cast<const std::byte*>(q) + row * qr * es;
      p.k = cache_.k_row(s, 0);
      p.v = cache_.v_row(s, 0);
      p.out = out + row * std::int64_t{c.h} * c.d_v;
      lse_s.assign(static_cast<std::size_t>(n * c.h), 0.0f);
      p.lse = lse_s.data();
      p.b = 1;
      p.h = c.h;
      p.h_k = c.h_k;
      p.d = c.d;
      p.d_v = c.d_v;
      p.cu_seqlens = cu;
      p.mask = c.mask;
      p.mask.causal = true;
      p.mask.window_right = 0;
      p.layout = c.prefill_layout;
      RingStats rs;
      ring_attention_forward(comm_, engine_, p, {}, &rs);
      for (const auto& step : rs.steps) {
        st.compute_s += step.compute_s;
        st.merge_s += step.wait_s;
        st.bytes += static_cast<double>(step.bytes);
      }
      if (lse && n > 0)  // [h, n] of this sequence -> [h, t_r] at column `row`
        for (int hh = 0; hh < c.h; ++hh)
          std::memcpy(lse + hh * t_r + row, lse_s.data() + hh * n,
                      sizeof(float) * static_cast<std::size_t>(n));
    }
    row += n;
  }
  st.total_s = max_over_ranks(comm_, detail::ring_now_s() - t0);
  return st;
}

std::vector<std::int64_t> KvSession::lengths() const {
  std::vector<std::int64_t> n;
  for (int s = 0; s < cache_.config().b; ++s) n.push_back(cache_.length(s));
  return n;
}

std::vector<KvSession::LocalRun> KvSession::local_runs(int t) const {
  const MaskParams& m = cache_.config().mask;
  std::vector<LocalRun> runs;
  for (int s = 0; s < cache_.config().b; ++s) {
    const std::int64_t L = cache_.length(s);
    const auto to = static_cast<std::int32_t>(cache_.local_count(s, L));
    std::int64_t last_first = -1;  // first visible position of the previous row
    for (int i = 0; i < t; ++i) {
      const std::int64_t first = std::min(L, first_visible_pos(m, L + i));
      const auto from = first == last_first
                            ? runs.back().from
                            : static_cast<std::int32_t>(cache_.local_count(s, first));
      last_first = first;
      if (i > 0 && runs.back().from == from) {
        ++runs.back().rows;
      } else {
        runs.push_back(LocalRun{s, i, 1, to, from});
      }
    }
  }
  return runs;
}

void KvSession::attend_local(int t, const void* q, const std::vector<LocalRun>& runs,
                             std::vector<float>& records) {
  // One kernel call over the paged cache with variable query lengths (cu_seqlens_q): each
  // "sequence" j of the call is one run, its rows the next rows of q [b, t, h, d] (the runs
  // tile them in order), its keys the local slots [from, to) of its sequence (leftpad =
  // from, cache_seqlens = to, no mask: every key of the range precedes every row).
  const SessionConfig& c = cache_.config();
  const int nb = static_cast<int>(runs.size());
  const int pages = cache_.pages_per_seq();
  // Scratch buffers reused across calls (a decode step allocates nothing once they grew).
  std::vector<std::int32_t>& table = scratch_.table;
  std::vector<std::int32_t>& cu_q = scratch_.cu_q;
  std::vector<std::int32_t>& to = scratch_.to;
  std::vector<std::int32_t>& from = scratch_.from;
  table.resize(static_cast<std::size_t>(nb) * pages);
  cu_q.assign(static_cast<std::size_t>(nb) + 1, 0);
  to.clear();
  from.clear();
  int max_rows = 1;
  for (int j = 0; j < nb; ++j) {
    const LocalRun& r = runs[static_cast<std::size_t>(j)];
    std::copy_n(cache_.page_table().begin() + std::int64_t{r.s} * pages, pages,
                table.begin() + std::int64_t{j} * pages);
    cu_q[static_cast<std::size_t>(j) + 1] = cu_q[static_cast<std::size_t>(j)] + r.rows;
    to.push_back(r.to);
    from.push_back(r.from);
    max_rows = std::max(max_rows, r.rows);
  }
  const std::int64_t total = std::int64_t{c.b} * t;
  std::vector<float>& out = scratch_.out;
  std::vector<float>& lse = scratch_.lse;
  out.resize(static_cast<std::size_t>(total) * c.h * c.d_v);
  lse.resize(static_cast<std::size_t>(total) * c.h);
  KvCacheParams p;
  p.dtype = c.dtype;
  p.out_dtype = DType::kF32;
  p.q = q;
  p.k_cache = cache_.k_cache();
  p.v_cache = cache_.v_cache();
  p.out = out.data();
  p.lse = lse.data();
  p.q_head_stride = c.d;
  p.q_row_stride = std::int64_t{c.h} * c.d;
  p.k_cache_head_stride = c.d;
  p.k_cache_row_stride = std::int64_t{c.h_k} * c.d;
  p.k_cache_batch_stride = std::int64_t{cache_.page_size()} * p.k_cache_row_stride;
  p.v_cache_head_stride = c.d_v;
  p.v_cache_row_stride = std::int64_t{c.h_k} * c.d_v;
  p.v_cache_batch_stride = std::int64_t{cache_.page_size()} * p.v_cache_row_stride;
  p.out_head_stride = c.d_v;
  p.out_row_stride = std::int64_t{c.h} * c.d_v;
  p.b = nb;
  p.s_q = max_rows;
  p.cu_seqlens_q = cu_q.data();
  p.h = c.h;
  p.h_k = c.h_k;
  p.d = c.d;
  p.d_v = c.d_v;
  p.page_table = table.data();
  p.page_table_batch_stride = pages;
  p.num_blocks = c.b * pages;
  p.page_size = cache_.page_size();
  p.max_pages = pages;
  p.cache_seqlens = to.data();
  p.cache_leftpad = from.data();
  p.mask.scale = c.mask.scale;
  p.mask.softcap = c.mask.softcap;
  engine_.forward_kvcache(p);
  // out [total, h, d_v] is already [b, t, h] row order; lse [h, total].
  records.resize(static_cast<std::size_t>(total) * c.h * (c.d_v + 1));
  detail::to_records(
      out.data(), lse.data(), total * c.h, c.d_v,
      [&](std::int64_t r) { return (r % c.h) * total + r / c.h; }, records.data());
}

void KvSession::append(int t, const void* k, const void* v) {
  const SessionConfig& c = cache_.config();
  const std::size_t es = dtype_size(c.dtype);
  const std::int64_t kr = std::int64_t{c.h_k} * c.d, vr = std::int64_t{c.h_k} * c.d_v;
  for (int s = 0; s < c.b; ++s) {
    const std::int64_t base = cache_.length(s);
    cache_.grow(s, t);
    for (int i = 0; i < t; ++i) {
      const std::int64_t pos = base + i;
      if (cache_.owner(s, pos) != comm_.rank()) continue;
      const std::int64_t slot = cache_.local_count(s, pos);
      const std::int64_t src = std::int64_t{s} * t + i;
      std::memcpy(cache_.k_row(s, slot), static_cast<const std::byte*>(k) + src * kr * es,
                  static_cast<std::size_t>(kr) * es);
      std::memcpy(cache_.v_row(s, slot), static_cast<const std::byte*>(v) + src * vr * es,
                  static_cast<std::size_t>(vr) * es);
    }
  }
}

namespace {

// Records [b, t, h][d_v + 1] of query rows [lo, hi) of t new tokens per sequence against
// the new tokens' own keys [0, t), causal (query i sees new keys j <= i), windowed and
// chunked (the new tokens of sequence s sit at positions base[s] + i), computed from the
// replicated new q/k/v; other rows stay empty states. `out`, `lse` and `shift` are
// scratch buffers.
void attend_new(const Engine& engine, const SessionConfig& c, const std::vector<std::int64_t>& base,
                int t, int lo, int hi, const void* q, const void* k, const void* v,
                std::vector<float>& records, std::vector<float>& out, std::vector<float>& lse,
                std::vector<std::int64_t>& shift) {
  records.resize(static_cast<std::size_t>(c.b) * t * c.h * (c.d_v + 1));
  clear_records(records, c.d_v);
  if (hi <= lo) return;
  const int rows = hi - lo;
  const std::size_t es = dtype_size(c.dtype);
  out.resize(static_cast<std::size_t>(c.b) * rows * c.h * c.d_v);
  lse.resize(static_cast<std::size_t>(c.b) * c.h * rows);
  shift.assign(static_cast<std::size_t>(c.b), lo);
  FwdParams f;
  f.dtype = c.dtype;
  f.q = static_cast<const std::byte*>(q) + static_cast<std::size_t>(lo) * c.h * c.d * es;
  f.k = k;
  f.v = v;
  f.out = out.data();
  f.lse = lse.data();
  f.b = c.b;
  f.s_q = rows;
  f.s_k = t;
  f.h = c.h;
  f.h_k = c.h_k;
  f.d = c.d;
  f.d_v = c.d_v;
  f.q_head_stride = c.d;
  f.q_row_stride = std::int64_t{c.h} * c.d;
  f.q_batch_stride = std::int64_t{t} * f.q_row_stride;
  f.k_head_stride = c.d;
  f.k_row_stride = std::int64_t{c.h_k} * c.d;
  f.k_batch_stride = std::int64_t{t} * f.k_row_stride;
  f.v_head_stride = c.d_v;
  f.v_row_stride = std::int64_t{c.h_k} * c.d_v;
  f.v_batch_stride = std::int64_t{t} * f.v_row_stride;
  f.out_head_stride = c.d_v;
  f.out_row_stride = std::int64_t{c.h} * c.d_v;
  f.out_batch_stride = std::int64_t{rows} * f.out_row_stride;
  f.mask.scale = c.mask.scale;
  f.mask.softcap = c.mask.softcap;
  f.mask.causal = true;
  f.mask.window_left = c.mask.window_left;
  f.mask.mask_shift = shift.data();
  std::vector<std::int64_t> q_pos(base), k_pos(base);
  for (auto& x : q_pos) x += lo;
  if (c.mask.attention_chunk > 0) {
    f.mask.attention_chunk = c.mask.attention_chunk;
    f.mask.chunk_q_pos = q_pos.data();
    f.mask.chunk_k_pos = k_pos.data();
  }
  engine.forward(f);
  const int rec = c.d_v + 1;
  for (int s = 0; s < c.b; ++s)
    for (int i = 0; i < rows; ++i)
      for (int hh = 0; hh < c.h; ++hh) {
        const std::int64_t src = (std::int64_t{s} * rows + i) * c.h + hh;
        const std::int64_t dst = (std::int64_t{s} * t + lo + i) * c.h + hh;
        std::memcpy(&records[static_cast<std::size_t>(dst * rec)],
                    &out[static_cast<std::size_t>(src * c.d_v)],
                    sizeof(float) * static_cast<std::size_t>(c.d_v));
        records[static_cast<std::size_t>(dst * rec + c.d_v)] =
            lse[static_cast<std::size_t>((std::int64_t{s} * c.h + hh) * rows + i)];
      }
}

}  // namespace

StepStats KvSession::decode(int t, const void* q, const void* k, const void* v, float* out,
                            float* lse, int root) {
  const SessionConfig& c = cache_.config();
  const double t0 = detail::ring_now_s();
  comm::run_collectively(comm_, [&] {
    RA_CHECK_ARG_GE(t, 1, "session decode: tokens per step t");
    RA_CHECK_ARG(root >= -1 && root < comm_.size(),
                 "session decode: root " << root << " outside [-1, " << comm_.size() << ")");
    for (int s = 0; s < c.b; ++s) cache_.check_room(s, t);
  });
  StepStats st;
  // History: row i of sequence s (position L_s + i) sees every cached key, from
  // position L_s + i - w_left on with a window and from the start of its chunk with
  // attention_chunk: one call whose runs group the rows with the same first key.
  double tc = detail::ring_now_s();
  std::vector<float>& records = scratch_.records;
  std::vector<float>& fresh = scratch_.fresh;
  attend_local(t, q, local_runs(t), records);
  // The step's own tokens, causally: rank 0 adds them (they are tiny).
  attend_new(engine_, c, lengths(), t, 0, comm_.rank() == 0 ? t : 0, q, k, v, fresh, scratch_.out,
             scratch_.lse, scratch_.shift);
  merge_records_into(records, fresh, c.d_v);
  st.compute_s = detail::ring_now_s() - tc;
  append(t, k, v);
  // The merge reduction: one collective over the packed records [b, t, h][d_v + 1]
  // (o and lse of a row side by side, one MPI datatype per row, the LSE merge as the
  // MPI operation: log2(P) rounds of b t h (d_v + 1) 4 bytes).
  st.local_s = detail::ring_now_s() - t0;
  if (merge_after_barrier_) comm_.barrier();
  tc = detail::ring_now_s();
  const double enter_s = tc - t0;
  const std::int64_t rows = std::int64_t{c.b} * t * c.h;
  merge_across_ranks(comm_, records.data(), rows, c.d_v, root);
  st.reduce_s = detail::ring_now_s() - tc;
  // Attention sinks: once, on the merged rows ([b, t, h] records; head = row % h).
  apply_sinks(records.data(), c.d_v + 1, records.data() + c.d_v, c.d_v + 1, c.mask.sinks, rows, c.h,
              c.d_v);
  st.bytes = static_cast<double>(rows) * (c.d_v + 1) * 4.0;
  if (root < 0 || comm_.rank() == root) from_records(records, c.b, t, c.h, c.d_v, out, lse);
  // One allgather of every rank's times: the step's latency (slowest rank) and the
  // split of the reduction into merge and waiting (StepStats).
  detail::finish_decode_stats(comm_, enter_s, detail::ring_now_s() - t0, st);
  return st;
}

StepStats KvSession::extend(int s1, const void* q, const void* k, const void* v, float* out,
                            float* lse, ExtendMode mode, ExtendPlan* plan_out, int root,
                            const CostConstants& constants) {
  const SessionConfig& c = cache_.config();
  const int P = comm_.size(), rank = comm_.rank();
  const double t0 = detail::ring_now_s();
  comm::run_collectively(comm_, [&] {
    RA_CHECK_ARG_GE(s1, 1, "session extend: new tokens S1");
    RA_CHECK(
        c.mask.window_left < 0, UnsupportedError,
        "session extend: windows are not supported (window left " << c.mask.window_left << ")");
    RA_CHECK_ARG(root >= -1 && root < P,
                 "session extend: root " << root << " outside [-1, " << P << ")");
    for (int s = 0; s < c.b; ++s) cache_.check_room(s, s1);
  });
  comm::check_consistent(comm_, {{"extend mode", extend_mode_name(mode)}});
  std::int64_t context = 0;
  for (int s = 0; s < c.b; ++s) context = std::max(context, cache_.length(s));
  const ExtendPlan plan = plan_extend(c, P, context, s1, mode, constants);
  if (plan_out) *plan_out = plan;
  StepStats st;
  // This rank's share of the new tokens' rows: zigzag chunks r and 2P-1-r of 2P (the
  // causal part among the new tokens costs ~ row index, so a contiguous share left the
  // last rank about twice the mean work). The causal part is split so in both modes; in
  // pass-KV the share is also the rows this rank finishes.
  const auto share = [&](int r) {
    std::vector<std::pair<int, int>> ranges;  // [first, end)
    for (const Chunk& ch : shard_chunks(ShardLayout::kZigzag, s1, P, r))
      if (ch.count > 0)
        ranges.push_back({static_cast<int>(ch.first), static_cast<int>(ch.first + ch.count)});
    return ranges;
  };
  const std::vector<std::pair<int, int>> mine_ranges = share(rank);
  std::vector<int> mine_rows;  // this rank's rows of each sequence, in share order
  for (const auto& [f, e] : mine_ranges)
    for (int i = f; i < e; ++i) mine_rows.push_back(i);
  const int rows = static_cast<int>(mine_rows.size());
  std::vector<float> records, fresh;
  const std::size_t es = dtype_size(c.dtype);
  const std::int64_t qr = std::int64_t{c.h} * c.d;
  double tc = detail::ring_now_s();
  if (plan.mode == ExtendMode::kPassQ) {
    // Every new query against this rank's cached keys (all visible: they precede it;
    // with attention_chunk those from the start of the query's chunk on).
    attend_local(s1, q, local_runs(s1), records);
  } else {
    // Pass-KV: this rank's query rows stay (gathered into q_mine [b, rows, h, d]); the
    // cached context travels. At step j rank r holds the context shard of rank (r - j)
    // mod P (all b sequences, K then V, contiguous rows): its queries attend to all of it
    // (it precedes them), partials merged into accumulators. Bytes per step: the largest
    // shard.
    records.resize(static_cast<std::size_t>(c.b) * s1 * c.h * (c.d_v + 1));
    clear_records(records, c.d_v);
    std::vector<std::byte> q_mine(static_cast<std::size_t>(std::int64_t{c.b} * rows * qr) * es);
    {
      std::byte* dst = q_mine.data();
      for (int s = 0; s < c.b; ++s)
        for (const auto& [f, e] : mine_ranges) {
          const std::size_t n = static_cast<std::size_t>((e - f) * qr) * es;
          std::memcpy(dst,
                      static_cast<const std::byte*>(q) +
                          static_cast<std::size_t>((std::int64_t{s} * s1 + f) * qr) * es,
                      n);
          dst += n;
        }
    }
    const std::int64_t kr = std::int64_t{c.h_k} * c.d, vr = std::int64_t{c.h_k} * c.d_v;
    std::vector<std::vector<std::int64_t>> counts(static_cast<std::size_t>(P));
    std::size_t max_bytes = 0;
    for (int r = 0; r < P; ++r) {
      std::size_t bytes = 0;
      for (int s = 0; s < c.b; ++s) {
        counts[static_cast<std::size_t>(r)].push_back(cache_.count(s, cache_.length(s), r));
        bytes +=
            static_cast<std::size_t>(counts[static_cast<std::size_t>(r)].back() * (kr + vr)) * es;
      }
      max_bytes = std::max(max_bytes, bytes);
    }
    comm::RingExchange ex(comm_, std::max<std::size_t>(max_bytes, 1));
    std::byte* w = ex.current();
    for (int s = 0; s < c.b; ++s) {
      const std::int64_t n = counts[static_cast<std::size_t>(rank)][static_cast<std::size_t>(s)];
      std::memcpy(w, cache_.k_row(s, 0), static_cast<std::size_t>(n * kr) * es);
      w += static_cast<std::size_t>(n * kr) * es;
      std::memcpy(w, cache_.v_row(s, 0), static_cast<std::size_t>(n * vr) * es);
      w += static_cast<std::size_t>(n * vr) * es;
    }
    // This rank's rows only: accumulators o [b, rows, h, d_v] and lse [b, rows, h],
    // merged in place after every kernel call (O(rows) work per step, not O(S1)).
    const std::int64_t srows = std::int64_t{rows} * c.h;
    std::vector<float> acc_o(static_cast<std::size_t>(c.b * srows * c.d_v), 0.0f);
    std::vector<float> acc_l(static_cast<std::size_t>(c.b * srows), kNegInf);
    std::vector<float> o(static_cast<std::size_t>(srows * c.d_v));
    std::vector<float> l(static_cast<std::size_t>(srows)), l_rows(static_cast<std::size_t>(srows));
    // The next shard's transfer moves during the kernel call too (Open MPI moves a large
    // message only inside MPI calls where it has no single-copy path).
    struct Progress {
      comm::RingExchange* ex = nullptr;
      std::exception_ptr error;
      static void call(void* self) {
        auto* pr = static_cast<Progress*>(self);
        if (pr->error) return;
        try {
          pr->ex->progress();
        } catch (...) {
          pr->error = std::current_exception();
        }
      }
    } progress{&ex, nullptr};
    for (int j = 0; j < P; ++j) {
      const int src = (rank - j + P) % P;
      if (j < P - 1) ex.start();
      const std::byte* base = ex.current();
      for (int s = 0; s < c.b && rows > 0; ++s) {
        const std::int64_t n = counts[static_cast<std::size_t>(src)][static_cast<std::size_t>(s)];
        const std::byte* kp = base;
        const std::byte* vp = kp + static_cast<std::size_t>(n * kr) * es;
        base = vp + static_cast<std::size_t>(n * vr) * es;
        if (n == 0) continue;
        // Runs of this rank's rows [i0, i1) (share order) that share their first visible
        // position (all of them without attention_chunk: one call; with it the rows of one
        // chunk) see the shard's keys [kf, n): its keys are in position order, so
        // "position >= first" is a suffix.
        const std::int64_t L = cache_.length(s);
        const auto first_of = [&](int i) {
          return std::min(L, first_visible_pos(c.mask, L + mine_rows[static_cast<std::size_t>(i)]));
        };
        for (int i0 = 0; i0 < rows;) {
          const std::int64_t first = first_of(i0);
          int i1 = i0 + 1;
          while (i1 < rows && first_of(i1) == first) ++i1;
          const int nr = i1 - i0, r0 = i0;
          i0 = i1;
          const std::int64_t kf = first > 0 ? cache_.count(s, first, src) : 0;
          const std::int64_t nk = n - kf;
          if (nk <= 0) continue;
          FwdParams f;
          f.dtype = c.dtype;
          f.q = q_mine.data() + static_cast<std::size_t>((std::int64_t{s} * rows + r0) * qr) * es;
          f.k = kp + static_cast<std::size_t>(kf * kr) * es;
          f.v = vp + static_cast<std::size_t>(kf * vr) * es;
          f.out = o.data();
          f.lse = l.data();
          f.b = 1;
          f.s_q = nr;
          f.s_k = static_cast<int>(nk);
          f.h = c.h;
          f.h_k = c.h_k;
          f.d = c.d;
          f.d_v = c.d_v;
          f.q_head_stride = c.d;
          f.q_row_stride = qr;
          f.k_head_stride = c.d;
          f.k_row_stride = kr;
          f.v_head_stride = c.d_v;
          f.v_row_stride = vr;
          f.out_head_stride = c.d_v;
          f.out_row_stride = std::int64_t{c.h} * c.d_v;
          f.mask.scale = c.mask.scale;
          f.mask.softcap = c.mask.softcap;
          if (j < P - 1) {
            f.progress.fn = &Progress::call;
            f.progress.ctx = &progress;
          }
          engine_.forward(f);
          if (progress.error) std::rethrow_exception(progress.error);
          for (int i = 0; i < nr; ++i)  // kernel lse [h, nr] -> [nr, h]
            for (int hh = 0; hh < c.h; ++hh)
              l_rows[static_cast<std::size_t>(i * c.h + hh)] =
                  l[static_cast<std::size_t>(hh * nr + i)];
          const std::int64_t acc = s * srows + std::int64_t{r0} * c.h;  // first record
          merge_state_inplace(acc_o.data() + acc * c.d_v, acc_l.data() + acc, o.data(),
                              l_rows.data(), std::int64_t{nr} * c.h, c.d_v);
        }
      }
      if (j < P - 1) {
        const double tw = detail::ring_now_s();
        ex.finish();
        st.merge_s += detail::ring_now_s() - tw;
        st.bytes += static_cast<double>(max_bytes);
      }
    }
    // The finished rows into the records at their positions (the rest stay empty).
    for (int s = 0; s < c.b; ++s) {
      std::int64_t local = 0;  // row index within this rank's share
      for (const auto& [f, e] : mine_ranges)
        for (int i = f; i < e; ++i, ++local)
          for (int hh = 0; hh < c.h; ++hh) {
            const std::int64_t src = (std::int64_t{s} * rows + local) * c.h + hh;
            const std::int64_t dst = (std::int64_t{s} * s1 + i) * c.h + hh;
            float* x = &records[static_cast<std::size_t>(dst * (c.d_v + 1))];
            std::memcpy(x, &acc_o[static_cast<std::size_t>(src * c.d_v)],
                        sizeof(float) * static_cast<std::size_t>(c.d_v));
            x[c.d_v] = acc_l[static_cast<std::size_t>(src)];
          }
    }
  }
  // The causal part among the new tokens, for this rank's rows.
  const std::vector<std::int64_t> base = lengths();
  for (const auto& [f, e] : mine_ranges) {
    attend_new(engine_, c, base, s1, f, e, q, k, v, fresh, scratch_.out, scratch_.lse,
               scratch_.shift);
    merge_records_into(records, fresh, c.d_v);
  }
  st.compute_s = detail::ring_now_s() - tc - st.merge_s;
  append(s1, k, v);
  tc = detail::ring_now_s();
  const std::int64_t all_rows = std::int64_t{c.b} * s1 * c.h;
  const int rec = c.d_v + 1;
  if (plan.mode == ExtendMode::kPassQ) {
    // Partials of every row on every rank: the merge reduction.
    merge_across_ranks(comm_, records.data(), all_rows, c.d_v, root);
    st.bytes += static_cast<double>(all_rows) * rec * 4.0;
  } else {
    // Each rank finished its own rows: an allgather (gather to root) of the slices; rank
    // r's block holds its share's rows of every sequence, in share order.
    std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
    std::vector<std::vector<std::pair<int, int>>> shares(static_cast<std::size_t>(P));
    for (int r = 0; r < P; ++r) {
      shares[static_cast<std::size_t>(r)] = share(r);
      std::int64_t n = 0;
      for (const auto& [f, e] : shares[static_cast<std::size_t>(r)]) n += e - f;
      n *= std::int64_t{c.b} * c.h * rec;
      RA_CHECK(n <= INT32_MAX, UnsupportedError, "session extend: " << n << " floats per rank");
      counts[static_cast<std::size_t>(r)] = static_cast<int>(n);
      displs[static_cast<std::size_t>(r)] = r == 0 ? 0
                                                   : displs[static_cast<std::size_t>(r - 1)] +
                                                         counts[static_cast<std::size_t>(r - 1)];
    }
    std::vector<float> mine;
    mine.reserve(static_cast<std::size_t>(counts[static_cast<std::size_t>(rank)]));
    for (int s = 0; s < c.b; ++s)
      for (const auto& [f, e] : mine_ranges) {
        const auto first = records.begin() + (std::int64_t{s} * s1 + f) * c.h * rec;
        mine.insert(mine.end(), first, first + std::int64_t{e - f} * c.h * rec);
      }
    std::vector<float> all(records.size());
    if (root < 0) {
      RA_MPI_CHECK(MPI_Allgatherv(mine.data(), counts[static_cast<std::size_t>(rank)], MPI_FLOAT,
                                  all.data(), counts.data(), displs.data(), MPI_FLOAT,
                                  comm_.get()));
    } else {
      RA_MPI_CHECK(MPI_Gatherv(mine.data(), counts[static_cast<std::size_t>(rank)], MPI_FLOAT,
                               all.data(), counts.data(), displs.data(), MPI_FLOAT, root,
                               comm_.get()));
    }
    const float* src = all.data();
    for (int r = 0; r < P; ++r)
      for (int s = 0; s < c.b; ++s)
        for (const auto& [f, e] : shares[static_cast<std::size_t>(r)]) {
          const std::int64_t n = std::int64_t{e - f} * c.h * rec;
          std::copy(src, src + n, records.begin() + (std::int64_t{s} * s1 + f) * c.h * rec);
          src += n;
        }
    st.bytes += static_cast<double>(mine.size()) * 4.0;
  }
  apply_sinks(records.data(), rec, records.data() + c.d_v, rec, c.mask.sinks, all_rows, c.h, c.d_v);
  st.merge_s += detail::ring_now_s() - tc;
  if (root < 0 || rank == root) from_records(records, c.b, s1, c.h, c.d_v, out, lse);
  st.total_s = max_over_ranks(comm_, detail::ring_now_s() - t0);
  return st;
}

}  // namespace ringattn
