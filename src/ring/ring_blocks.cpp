#include "ring/ring_blocks.hpp"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <sstream>
#include <string>

#include "ring/block_mask.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"
#include "ringattn/version.hpp"

namespace ringattn {

namespace {

// Length of sequence i.
std::int64_t seq_len(const RingAttentionParams& p, int i) {
  return p.cu_seqlens ? p.cu_seqlens[i + 1] - p.cu_seqlens[i] : p.s;
}

// Local checks on this rank's arguments (the ranks then agree on the outcome).
void validate_local(const RingAttentionParams& p, int ranks, int rank) {
  RA_CHECK_ARG_GT(p.b, 0, "ring: batch size b");
  RA_CHECK_ARG_GT(p.h, 0, "ring: query heads h");
  RA_CHECK_ARG_GT(p.h_k, 0, "ring: key/value heads h_k");
  RA_CHECK_ARG(p.h % p.h_k == 0, "ring: h_k: number of query heads h="
                                     << p.h << " must be a multiple of h_k=" << p.h_k);
  RA_CHECK_ARG(p.d > 0 && p.d <= kMaxHeadDim,
               "ring: head dim d = " << p.d << " outside [1, " << kMaxHeadDim << "]");
  RA_CHECK_ARG(p.d_v > 0 && p.d_v <= kMaxHeadDim,
               "ring: head dim d_v = " << p.d_v << " outside [1, " << kMaxHeadDim << "]");
  RA_CHECK(p.dtype == DType::kF32 || p.dtype == DType::kBF16 || p.dtype == DType::kF16,
           UnsupportedError,
           "ring: dtype " << dtype_name(p.dtype) << " not supported (fp32, bf16, fp16)");
  RA_CHECK(p.mask.mask_shift == nullptr, UnsupportedError,
           "ring: mask.mask_shift is set by the ring itself and must be nullptr");
  RA_CHECK_ARG(p.mask.window_left >= -1 && p.mask.window_right >= -1,
               "ring: window (" << p.mask.window_left << ", " << p.mask.window_right
                                << ") must be >= -1 (-1 = unbounded)");
  RA_CHECK(
      p.mask.chunk_q_pos == nullptr && p.mask.chunk_k_pos == nullptr && p.mask.chunk_stride == 1,
      UnsupportedError,
      "ring: mask.chunk_q_pos / chunk_k_pos / chunk_stride are set by the ring itself "
      "(nullptr, nullptr, 1); attention_chunk alone selects chunked attention");
  validate_mask(p.mask, p.h);
  if (p.cu_seqlens) {
    RA_CHECK_ARG_EQ(p.cu_seqlens[0], 0, "ring: cu_seqlens[0]");
    for (int i = 0; i < p.b; ++i)
      RA_CHECK_ARG(p.cu_seqlens[i + 1] >= p.cu_seqlens[i],
                   "ring: cu_seqlens must be non-decreasing, got cu_seqlens["
                       << i << "] = " << p.cu_seqlens[i] << " > cu_seqlens[" << i + 1
                       << "] = " << p.cu_seqlens[i + 1]);
  } else {
    RA_CHECK_ARG(p.s >= ranks, "ring: sequence length "
                                   << p.s << " is smaller than the number of ranks " << ranks
                                   << " (every rank needs a token)");
  }
  if (ring_local_rows(p, ranks, rank) > 0) {
    RA_CHECK_ARG(p.q && p.k && p.v && p.out, "ring: q, k, v and out must be non-null");
  }
}

}  // namespace

std::string detail::sinks_fingerprint(const float* sinks, int h) {
  if (sinks == nullptr) return "none";
  std::uint64_t hash = 1469598103934665603ull;  // FNV-1a over the fp32 bits
  for (int i = 0; i < h; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &sinks[i], sizeof bits);
    hash ^= bits;
    hash *= 1099511628211ull;
  }
  std::ostringstream os;
  os << "hash " << hash;
  return os.str();
}

namespace {

comm::Fields config_fields(const RingAttentionParams& p, int ranks, const char* mode) {
  std::uint64_t hash = 1469598103934665603ull;  // FNV-1a over cu_seqlens
  std::int64_t total = p.cu_seqlens ? p.cu_seqlens[p.b] : std::int64_t{p.b} * p.s;
  if (p.cu_seqlens)
    for (int i = 0; i <= p.b; ++i) {
      hash ^= static_cast<std::uint32_t>(p.cu_seqlens[i]);
      hash *= 1099511628211ull;
    }
  const auto str = [](auto v) {
    std::ostringstream os;
    os << v;
    return os.str();
  };
  return {{"version", version()},
          {"ranks", str(ranks)},
          {"ring mode", mode},
          {"dtype", dtype_name(p.dtype)},
          {"layout", layout_name(p.layout)},
          {"batch", str(p.b)},
          {"varlen", p.cu_seqlens ? "yes" : "no"},
          {"seqlen", p.cu_seqlens ? "varlen" : str(p.s)},
          {"total tokens", str(total)},
          {"cu_seqlens hash", str(hash)},
          {"heads", str(p.h)},
          {"kv heads", str(p.h_k)},
          {"head dim", str(p.d)},
          {"v head dim", str(p.d_v)},
          {"causal", p.mask.causal ? "yes" : "no"},
          {"window", str(p.mask.window_left) + "," + str(p.mask.window_right)},
          {"attention chunk", str(p.mask.attention_chunk)},
          {"softcap", str(p.mask.softcap)},
          {"scale", str(p.mask.scale)},
          {"sinks", detail::sinks_fingerprint(p.mask.sinks, p.h)}};
}

}  // namespace

std::int64_t ring_local_rows(const RingAttentionParams& p, int ranks, int rank) {
  std::int64_t n = 0;
  for (int i = 0; i < p.b; ++i) n += shard_length(p.layout, seq_len(p, i), ranks, rank);
  return n;
}

namespace detail {

double ring_now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void ring_validate(const comm::Communicator& comm, const RingAttentionParams& p, const char* mode) {
  comm::run_collectively(comm, [&] { validate_local(p, comm.size(), comm.rank()); });
  comm::check_consistent(comm, config_fields(p, comm.size(), mode));
}

void run_or_abort(const comm::Communicator& comm, const char* what,
                  const std::function<void()>& steps) {
  try {
    steps();
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "ringattn: rank %d: fatal error %s: out of memory\n", comm.rank(), what);
    std::fflush(stderr);
    MPI_Abort(comm.get(), 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn: rank %d: fatal error %s: %s\n", comm.rank(), what, e.what());
    std::fflush(stderr);
    MPI_Abort(comm.get(), 1);
  }
}

RingPlan make_ring_plan(const RingAttentionParams& p, int ranks) {
  RingPlan plan;
  plan.p = &p;
  plan.ranks = ranks;
  plan.offsets.resize(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    auto& o = plan.offsets[static_cast<std::size_t>(r)];
    o.assign(static_cast<std::size_t>(p.b) + 1, 0);
    for (int i = 0; i < p.b; ++i)
      o[static_cast<std::size_t>(i) + 1] =
          o[static_cast<std::size_t>(i)] + shard_length(p.layout, seq_len(p, i), ranks, r);
    plan.max_rows = std::max(plan.max_rows, o.back());
  }
  if (p.cu_seqlens) {
    for (int i = 0; i < p.b; ++i) plan.groups.push_back(RingGroup{i, 1, seq_len(p, i)});
  } else {
    plan.groups.push_back(RingGroup{0, p.b, p.s});
  }
  for (const auto& g : plan.groups) {
    plan.max_nb = std::max(plan.max_nb, g.count);
    for (int r = 0; r < ranks; ++r)
      for (const auto& c : shard_chunks(p.layout, g.len, ranks, r))
        plan.max_chunk = std::max(plan.max_chunk, c.count);
  }
  plan.esize = dtype_size(p.dtype);
  plan.q_row = std::int64_t{p.h} * p.d;
  plan.k_row = std::int64_t{p.h_k} * p.d;
  plan.v_row = std::int64_t{p.h_k} * p.d_v;
  plan.o_row = std::int64_t{p.h} * p.d_v;
  plan.wl = p.mask.window_left;
  plan.wr = p.mask.causal ? 0 : p.mask.window_right;
  plan.chunk = p.mask.attention_chunk;
  return plan;
}

std::int64_t ring_piece_rows(const RingPlan& plan, const RingOptions& options) {
  const std::int64_t chunk = std::max<std::int64_t>(1, plan.max_chunk);
  const std::int64_t piece = options.piece_rows > 0 ? options.piece_rows : chunk;
  return std::max<std::int64_t>(1, std::min(piece, chunk));
}

namespace {

// The kernel's partial outputs, kept between ring calls (BufferPool: a fresh multi-MiB
// buffer costs a page fault and a page clear per 4 KiB on every call).
BufferPool& ring_scratch_pool() {
  static BufferPool pool(2);
  return pool;
}

float* take_floats(std::size_t n, BufferPool::Lease& lease) {
  if (!BufferPool::take(&ring_scratch_pool(), n * sizeof(float), lease)) throw std::bad_alloc();
  return static_cast<float*>(lease.data());
}

}  // namespace

RingScratch::RingScratch(const RingPlan& plan, std::int64_t piece_rows)
    : piece(piece_rows),
      rows_cap(std::max<std::int64_t>(piece_rows, std::min(2 * piece_rows, plan.max_rows))),
      lse_rows(static_cast<std::size_t>(rows_cap * plan.p->h)),
      shifts(static_cast<std::size_t>(plan.max_nb)),
      chunk_q_pos(static_cast<std::size_t>(plan.max_nb)),
      chunk_k_pos(static_cast<std::size_t>(plan.max_nb)) {
  o = take_floats(static_cast<std::size_t>(plan.max_nb * rows_cap * plan.o_row), o_lease);
  lse = take_floats(static_cast<std::size_t>(plan.max_nb * rows_cap * plan.p->h), lse_lease);
}

namespace {

// Hands `progress` to the kernel as a ProgressHook, which must not throw: an error
// (e.g. a failed MPI_Test) is kept and rethrown once the kernel call has returned.
struct ProgressBridge {
  const std::function<void()>* fn = nullptr;
  std::exception_ptr error;
  static void call(void* self) {
    auto* b = static_cast<ProgressBridge*>(self);
    if (b->error) return;
    try {
      (*b->fn)();
    } catch (...) {
      b->error = std::current_exception();
    }
  }
};

}  // namespace

ShardPlan plan_shard(const RingPlan& plan, int q_rank, int k_rank, std::int64_t piece,
                     std::int64_t rows_cap) {
  const RingAttentionParams& p = *plan.p;
  const auto& qoff = plan.offsets[static_cast<std::size_t>(q_rank)];
  const auto& koff = plan.offsets[static_cast<std::size_t>(k_rank)];
  const bool chunked = plan.chunk > 0;
  ShardPlan out;
  // For every group of sequences, every query chunk of q_rank, every piece of `piece`
  // rows of it, and every run of k_rank's key chunks: chunks the mask hides for the
  // whole piece are skipped; a run of consecutive visible chunks (stored back to back)
  // becomes ONE call when one kernel mask describes it exactly (combine_mask), else each
  // chunk gets its own call (fully visible: unmasked; else the kernel's mask shifted onto
  // the block diagonal). Each call's keys are trimmed to those some row sees (the kernel
  // packs every key it is given). With attention_chunk the visibility scan also applies
  // the chunk rule (visible_key_span: a key chunk the chunk rule hides from the whole
  // piece is skipped), every visible key chunk is its own call, trimmed to the keys of
  // the piece's chunks, and the kernel applies the chunk rule at the call's sequence
  // positions (ShardCall::q_pos, k_pos).
  for (int gi = 0; gi < static_cast<int>(plan.groups.size()); ++gi) {
    const RingGroup& g = plan.groups[static_cast<std::size_t>(gi)];
    const auto q_chunks = shard_chunks(p.layout, g.len, plan.ranks, q_rank);
    const auto k_chunks = shard_chunks(p.layout, g.len, plan.ranks, k_rank);
    const int nk = static_cast<int>(k_chunks.size());
    std::vector<std::int64_t> k_lo(k_chunks.size() + 1, 0);  // local row of each chunk
    for (int c = 0; c < nk; ++c) k_lo[c + 1] = k_lo[c] + k_chunks[c].count;
    // A call's key rows: chunks [c0, c1), of which local keys [span.lo, span.hi] of the
    // run (everything without attention_chunk) can be visible.
    const auto emit = [&](std::int64_t q_row0, std::int64_t np, std::int64_t q_pos, int c0, int c1,
                          KeySpan span, BlockMask bm) {
      std::int64_t k_first = span.lo, k_last = span.hi;
      if (bm.kind == BlockMask::kPartial) {
        if (bm.window_right >= 0) k_last = std::min(k_last, np - 1 + bm.shift + bm.window_right);
        if (bm.window_left >= 0)
          k_first = std::max(k_first, std::max<std::int64_t>(0, bm.shift - bm.window_left));
      }
      if (k_first > k_last) return;
      if (bm.kind == BlockMask::kPartial) bm.shift -= k_first;
      const Chunk& kc = k_chunks[static_cast<std::size_t>(c0)];
      out.calls.push_back(ShardCall{gi, q_row0 - qoff[0], np, koff[g.first] + k_lo[c0] + k_first,
                                    k_last - k_first + 1, bm, q_pos, kc.first + k_first * kc.stride,
                                    kc.stride});
    };
    // Calls wait in `pending` so that whole query chunks stored back to back which see
    // the same key run fully become ONE call (zigzag: both query chunks of a rank see an
    // earlier rank's key chunk; one call packs those keys once). Pieces smaller than a
    // chunk (--piece-rows) are never joined, nor are any with attention_chunk (a call's
    // query rows must be evenly spaced for the kernel's chunk positions). Merge order per
    // row is unchanged: a different call flushes the pending one first.
    struct Pending {
      std::int64_t q_row0 = 0, np = 0, q_pos = 0;
      int c0 = 0, c1 = 0;
      KeySpan span;
      BlockMask bm;
      bool whole = false;  // a whole query chunk
      bool set = false;
    } pending;
    const auto flush = [&] {
      if (pending.set)
        emit(pending.q_row0, pending.np, pending.q_pos, pending.c0, pending.c1, pending.span,
             pending.bm);
      pending.set = false;
    };
    const auto enqueue = [&](std::int64_t q_row0, std::int64_t np, std::int64_t q_pos, bool whole,
                             int c0, int c1, KeySpan span, BlockMask bm) {
      if (!chunked && pending.set && whole && pending.whole && bm.kind == BlockMask::kFull &&
          pending.bm.kind == BlockMask::kFull && pending.c0 == c0 && pending.c1 == c1 &&
          pending.q_row0 + pending.np == q_row0 && pending.np + np <= rows_cap) {
        pending.np += np;
        return;
      }
      flush();
      pending = Pending{q_row0, np, q_pos, c0, c1, span, bm, whole, true};
    };
    std::int64_t q_lo = 0;
    std::vector<KeySpan> spans(k_chunks.size());
    for (const auto& cq : q_chunks) {
      for (std::int64_t i0 = 0; i0 < cq.count; i0 += piece) {
        const std::int64_t np = std::min(piece, cq.count - i0);
        const std::int64_t qp0 = cq.first + i0 * cq.stride;
        for (int c = 0; c < nk; ++c) {
          spans[c] = visible_key_span(qp0, np, k_chunks[c].first, k_chunks[c].count, cq.stride,
                                      plan.wl, plan.wr, plan.chunk);
          if (spans[c].empty() && k_chunks[c].count > 0) ++out.skipped_blocks;
        }
        const auto call = [&](int c0, int c1, KeySpan span, BlockMask bm) {
          enqueue(qoff[g.first] + q_lo + i0, np, qp0, np == cq.count, c0, c1, span, bm);
        };
        for (int c0 = 0; c0 < nk;) {
          if (spans[c0].empty()) {
            ++c0;
            continue;
          }
          int c1 = c0 + 1;
          while (c1 < nk && !spans[c1].empty()) ++c1;
          BlockMask bm;
          if (!chunked && combine_mask(qp0, cq.stride, np, k_chunks.data() + c0, c1 - c0, plan.wl,
                                       plan.wr, &bm)) {
            call(c0, c1, KeySpan{0, k_lo[c1] - k_lo[c0] - 1}, bm);
          } else {
            for (int c = c0; c < c1; ++c)
              call(c, c + 1, chunked ? spans[c] : KeySpan{0, k_chunks[c].count - 1},
                   classify_block(qp0, np, k_chunks[c].first, k_chunks[c].count, cq.stride, plan.wl,
                                  plan.wr));
          }
          c0 = c1;
        }
      }
      q_lo += cq.count;
    }
    flush();
  }
  return out;
}

void attend_shard(const RingPlan& plan, const Engine& engine, int q_rank, const std::byte* q,
                  int k_rank, const std::byte* k, const std::byte* v, float* acc_o, float* acc_lse,
                  std::int64_t piece, RingScratch& scratch, const std::function<void()>& progress,
                  RingStepStats& st) {
  const RingAttentionParams& p = *plan.p;
  const auto& qoff = plan.offsets[static_cast<std::size_t>(q_rank)];
  const auto& koff = plan.offsets[static_cast<std::size_t>(k_rank)];
  const std::size_t es = plan.esize;
  const ShardPlan calls = plan_shard(plan, q_rank, k_rank, piece, scratch.rows_cap);
  st.skipped_blocks += calls.skipped_blocks;
  // Runs the planned calls in order. Every partial (o, lse) is merged into the
  // accumulators with merge_state_inplace (docs/semantics.md section 5); `progress` runs
  // before the first and after every call, and inside the kernel (ProgressHook: between
  // key tiles, at most every 100 us), so a transfer in flight keeps moving even where
  // Open MPI has no single-copy path and moves a large message only while both sides sit
  // in MPI calls.
  if (progress) progress();
  for (const ShardCall& c : calls.calls) {
    const RingGroup& g = plan.groups[static_cast<std::size_t>(c.group)];
    // Row strides between sequences of a dense group (each rank's n_r / n_src).
    const std::int64_t q_seq_rows = qoff[g.first + 1] - qoff[g.first];
    const std::int64_t k_seq_rows = koff[g.first + 1] - koff[g.first];
    const std::int64_t np = c.rows;
    FwdParams f;
    f.dtype = p.dtype;
    f.out_dtype = DType::kF32;
    f.q = q + static_cast<std::size_t>(c.q_row * plan.q_row) * es;
    f.k = k + static_cast<std::size_t>(c.k_row * plan.k_row) * es;
    f.v = v + static_cast<std::size_t>(c.k_row * plan.v_row) * es;
    f.out = scratch.o;
    f.lse = scratch.lse;
    f.q_batch_stride = q_seq_rows * plan.q_row;
    f.q_row_stride = plan.q_row;
    f.q_head_stride = p.d;
    f.k_batch_stride = k_seq_rows * plan.k_row;
    f.k_row_stride = plan.k_row;
    f.k_head_stride = p.d;
    f.v_batch_stride = k_seq_rows * plan.v_row;
    f.v_row_stride = plan.v_row;
    f.v_head_stride = p.d_v;
    f.out_batch_stride = np * plan.o_row;
    f.out_row_stride = plan.o_row;
    f.out_head_stride = p.d_v;
    f.b = g.count;
    f.s_q = static_cast<int>(np);
    f.s_k = static_cast<int>(c.keys);
    f.h = p.h;
    f.h_k = p.h_k;
    f.d = p.d;
    f.d_v = p.d_v;
    f.mask.scale = p.mask.scale;
    f.mask.softcap = p.mask.softcap;
    if (c.mask.kind == BlockMask::kPartial) {
      std::fill(scratch.shifts.begin(), scratch.shifts.begin() + g.count, c.mask.shift);
      f.mask.mask_shift = scratch.shifts.data();
      f.mask.window_left = c.mask.window_left;
      f.mask.window_right = c.mask.window_right;
    }
    if (plan.chunk > 0) {  // the chunk rule at the call's sequence positions
      std::fill(scratch.chunk_q_pos.begin(), scratch.chunk_q_pos.begin() + g.count, c.q_pos);
      std::fill(scratch.chunk_k_pos.begin(), scratch.chunk_k_pos.begin() + g.count, c.k_pos);
      f.mask.attention_chunk = plan.chunk;
      f.mask.chunk_q_pos = scratch.chunk_q_pos.data();
      f.mask.chunk_k_pos = scratch.chunk_k_pos.data();
      f.mask.chunk_stride = static_cast<int>(c.pos_stride);
    }
    ProgressBridge bridge;
    if (progress) {
      bridge.fn = &progress;
      f.progress.fn = &ProgressBridge::call;
      f.progress.ctx = &bridge;
    }
    engine.forward(f);
    if (bridge.error) std::rethrow_exception(bridge.error);
    ++st.kernel_calls;
    // Merge each sequence's rows: kernel lse [h, np] -> [np, h] to match rows.
    for (int sb = 0; sb < g.count; ++sb) {
      const float* l = scratch.lse + static_cast<std::int64_t>(sb) * p.h * np;
      for (std::int64_t i = 0; i < np; ++i)
        for (int hh = 0; hh < p.h; ++hh) scratch.lse_rows[i * p.h + hh] = l[hh * np + i];
      const std::int64_t row = c.q_row + sb * q_seq_rows;
      merge_state_inplace(acc_o + row * plan.o_row, acc_lse + row * p.h,
                          scratch.o + sb * np * plan.o_row, scratch.lse_rows.data(), np * p.h,
                          p.d_v);
    }
    if (progress) progress();
  }
}

void ring_write_lse(const RingPlan& plan, int rank, const float* acc_lse, float* lse) {
  const RingAttentionParams& p = *plan.p;
  const std::int64_t rows = plan.rows(rank);
  if (p.lse_layout == LseLayout::kRows) {
    std::copy(acc_lse, acc_lse + rows * p.h, lse);
  } else {
    lse_rows_to_api(acc_lse, rows, p.h, p.b, p.cu_seqlens != nullptr, lse);
  }
}

}  // namespace detail

void lse_rows_to_api(const float* rows_lse, std::int64_t rows, int h, int b, bool varlen,
                     float* api) {
  const std::int64_t n = varlen ? rows : rows / std::max(b, 1);  // rows per sequence (dense)
  for (std::int64_t r = 0; r < rows; ++r)
    for (int hh = 0; hh < h; ++hh)
      api[varlen ? hh * rows + r : ((r / n) * h + hh) * n + r % n] = rows_lse[r * h + hh];
}

void lse_api_to_rows(const float* api, std::int64_t rows, int h, int b, bool varlen,
                     float* rows_lse) {
  const std::int64_t n = varlen ? rows : rows / std::max(b, 1);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int hh = 0; hh < h; ++hh)
      rows_lse[r * h + hh] = api[varlen ? hh * rows + r : ((r / n) * h + hh) * n + r % n];
}

}  // namespace ringattn
