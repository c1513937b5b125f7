#include "ring/ring_blocks.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <sstream>
#include <string>

#include "ringattn/comm/collectives.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/softmax_state.hpp"
#include "ringattn/version.hpp"

namespace ringattn {

namespace {

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return -floor_div(-a, b); }

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
  validate_mask(p.mask, p.h);
  RA_CHECK(p.mask.attention_chunk == 0, UnsupportedError,
           "ring: attention_chunk = " << p.mask.attention_chunk
                                      << " is not supported by ring attention yet (0 = off)");
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
          {"softcap", str(p.mask.softcap)},
          {"scale", str(p.mask.scale)},
          {"sinks", detail::sinks_fingerprint(p.mask.sinks, p.h)}};
}

// Local key range [lo, hi] of chunk `ck` visible from a query at position qp
// (lo > hi: none), for the global window (wl, wr), -1 = unbounded.
void visible_range(std::int64_t qp, const Chunk& ck, int wl, int wr, std::int64_t* lo,
                   std::int64_t* hi) {
  *hi = ck.count - 1;
  *lo = 0;
  if (wr >= 0) *hi = std::min(*hi, floor_div(qp + wr - ck.first, ck.stride));
  if (wl >= 0) *lo = std::max(*lo, ceil_div(qp - wl - ck.first, ck.stride));
}

// Tries to express the mask of the nq query rows at positions q0 + i*qs against the
// keys of chunks[0..n) (stored back to back: one local key index over all of them)
// as ONE kernel mask, so that they run in one kernel call. Works when every row's
// visible keys form one contiguous local range [lo_i, hi_i] that moves with the
// row like the kernel's rule (hi_i = min(n-1, i + U), lo_i = max(0, i + Lo)); e.g.
// zigzag causal: [early chunk, fully visible] + [late chunk, diagonal] becomes one
// diagonal block with shift = size of the early chunk. Returns false otherwise.
bool combine_mask(std::int64_t q0, std::int64_t qs, std::int64_t nq, const Chunk* chunks, int n,
                  int wl, int wr, BlockMask* out) {
  if (n == 1) {
    *out = classify_block(q0, nq, chunks[0].first, chunks[0].count, qs, wl, wr);
    return chunks[0].stride == qs;
  }
  std::int64_t total = 0;
  for (int c = 0; c < n; ++c) total += chunks[c].count;
  // Pass 1: per-row combined range, contiguity, candidate U / Lo.
  bool has_u = false, has_lo = false, all_full = true;
  std::int64_t u = 0, lo_off = 0;
  const auto row_range = [&](std::int64_t i, std::int64_t* rlo, std::int64_t* rhi) {
    const std::int64_t qp = q0 + i * qs;
    *rlo = 1;
    *rhi = 0;  // empty
    std::int64_t base = 0;
    for (int c = 0; c < n; ++c) {
      std::int64_t a, b;
      visible_range(qp, chunks[c], wl, wr, &a, &b);
      if (a <= b) {
        if (*rlo > *rhi) {
          *rlo = base + a;
        } else if (*rhi + 1 != base + a) {
          return false;  // a gap
        }
        *rhi = base + b;
      }
      base += chunks[c].count;
    }
    return true;
  };
  for (std::int64_t i = 0; i < nq; ++i) {
    std::int64_t a, b;
    if (!row_range(i, &a, &b)) return false;
    if (a > b) {
      all_full = false;
      continue;
    }
    if (b < total - 1) {
      all_full = false;
      if (!has_u) has_u = true, u = b - i;
    }
    if (a > 0) {
      all_full = false;
      if (!has_lo) has_lo = true, lo_off = a - i;
    }
  }
  if (all_full) {
    out->kind = BlockMask::kFull;
    return true;
  }
  if (!has_u && !has_lo) return false;  // only empty rows besides full ones
  // Pass 2: the kernel rule with (U, Lo) must reproduce every row exactly.
  for (std::int64_t i = 0; i < nq; ++i) {
    std::int64_t a, b;
    row_range(i, &a, &b);
    const std::int64_t eb = has_u ? std::min(total - 1, i + u) : total - 1;
    const std::int64_t ea = has_lo ? std::max<std::int64_t>(0, i + lo_off) : 0;
    const bool empty = a > b, eempty = ea > eb;
    if (empty != eempty || (!empty && (a != ea || b != eb))) return false;
  }
  out->kind = BlockMask::kPartial;
  if (has_u) {
    if (has_lo && (u - lo_off < 0 || u - lo_off > INT_MAX)) return false;
    out->shift = u;
    out->window_right = 0;
    out->window_left = has_lo ? static_cast<int>(u - lo_off) : -1;
  } else {
    out->shift = lo_off;
    out->window_right = -1;
    out->window_left = 0;
  }
  return true;
}

}  // namespace

BlockMask classify_block(std::int64_t q0, std::int64_t nq, std::int64_t k0, std::int64_t nk,
                         std::int64_t stride, int window_left, int window_right) {
  // Global rule: key position kp visible from query position qp iff
  //   kp <= qp + wr  and  kp >= qp - wl.
  // With qp = q0 + i*st and kp = k0 + j*st this is, for local indices,
  //   j <= i + U,  U  = floor((q0 - k0 + wr) / st)
  //   j >= i + Lo, Lo = ceil ((q0 - k0 - wl) / st)
  const bool has_u = window_right >= 0;
  const bool has_lo = window_left >= 0;
  const std::int64_t u = has_u ? floor_div(q0 - k0 + window_right, stride) : 0;
  const std::int64_t lo = has_lo ? ceil_div(q0 - k0 - window_left, stride) : 0;
  BlockMask m;
  if ((has_u && nq - 1 + u < 0) || (has_lo && lo > nk - 1) || (has_u && has_lo && lo > u)) {
    m.kind = BlockMask::kHidden;
    return m;
  }
  if ((!has_lo || nq - 1 + lo <= 0) && (!has_u || nk - 1 <= u)) {
    m.kind = BlockMask::kFull;
    return m;
  }
  m.kind = BlockMask::kPartial;
  if (has_u) {
    m.shift = u;
    m.window_right = 0;
    m.window_left = has_lo ? static_cast<int>(u - lo) : -1;
  } else {
    m.shift = lo;
    m.window_right = -1;
    m.window_left = 0;
  }
  return m;
}

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
      shifts(static_cast<std::size_t>(plan.max_nb)) {
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

void attend_shard(const RingPlan& plan, const Engine& engine, int q_rank, const std::byte* q,
                  int k_rank, const std::byte* k, const std::byte* v, float* acc_o, float* acc_lse,
                  std::int64_t piece, RingScratch& scratch, const std::function<void()>& progress,
                  RingStepStats& st) {
  const RingAttentionParams& p = *plan.p;
  const auto& qoff = plan.offsets[static_cast<std::size_t>(q_rank)];
  const auto& koff = plan.offsets[static_cast<std::size_t>(k_rank)];
  const std::size_t es = plan.esize;
  // For every group of sequences, every query chunk of q_rank, every piece of
  // `piece` rows of it, and every run of k_rank's key chunks: chunks the mask hides
  // for the whole piece are skipped; a run of consecutive visible chunks (stored back
  // to back) goes to ONE kernel call when one kernel mask describes it exactly
  // (combine_mask), else each chunk gets its own call (fully visible: unmasked; else
  // the kernel's mask shifted onto the block diagonal). Every partial (o, lse) is
  // merged into the accumulators with merge_state_inplace (docs/semantics.md section 5);
  // `progress` runs before the first and after every call, and inside the kernel
  // (ProgressHook: between key tiles, at most every 100 us), so a transfer in flight
  // keeps moving even where Open MPI has no single-copy path and moves a large message
  // only while both sides sit in MPI calls.
  if (progress) progress();
  for (const auto& g : plan.groups) {
    const auto q_chunks = shard_chunks(p.layout, g.len, plan.ranks, q_rank);
    const auto k_chunks = shard_chunks(p.layout, g.len, plan.ranks, k_rank);
    const int nk = static_cast<int>(k_chunks.size());
    std::vector<std::int64_t> k_lo(k_chunks.size() + 1, 0);  // local row of each chunk
    for (int c = 0; c < nk; ++c) k_lo[c + 1] = k_lo[c] + k_chunks[c].count;
    // Row strides between sequences of a dense group (each rank's n_r / n_src).
    const std::int64_t q_seq_rows = qoff[g.first + 1] - qoff[g.first];
    const std::int64_t k_seq_rows = koff[g.first + 1] - koff[g.first];
    // One kernel call: query rows [q_row0, q_row0 + np) (global row index into the
    // shard) against the keys of chunks [c0, c1) under mask bm, trimmed to the keys
    // some row sees (the kernel packs every key it is given).
    const auto run_call = [&](std::int64_t q_row0, std::int64_t np, int c0, int c1, BlockMask bm) {
      std::int64_t k_first = 0, k_last = k_lo[c1] - k_lo[c0] - 1;
      if (bm.kind == BlockMask::kPartial) {
        if (bm.window_right >= 0) k_last = std::min(k_last, np - 1 + bm.shift + bm.window_right);
        if (bm.window_left >= 0) k_first = std::max<std::int64_t>(0, bm.shift - bm.window_left);
        if (k_first > k_last) return;
        bm.shift -= k_first;
      }
      const std::int64_t k_row0 = koff[g.first] + k_lo[c0] + k_first;
      FwdParams f;
      f.dtype = p.dtype;
      f.out_dtype = DType::kF32;
      f.q = q + static_cast<std::size_t>((q_row0 - qoff[0]) * plan.q_row) * es;
      f.k = k + static_cast<std::size_t>(k_row0 * plan.k_row) * es;
      f.v = v + static_cast<std::size_t>(k_row0 * plan.v_row) * es;
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
      f.s_k = static_cast<int>(k_last - k_first + 1);
      f.h = p.h;
      f.h_k = p.h_k;
      f.d = p.d;
      f.d_v = p.d_v;
      f.mask.scale = p.mask.scale;
      f.mask.softcap = p.mask.softcap;
      if (bm.kind == BlockMask::kPartial) {
        std::fill(scratch.shifts.begin(), scratch.shifts.begin() + g.count, bm.shift);
        f.mask.mask_shift = scratch.shifts.data();
        f.mask.window_left = bm.window_left;
        f.mask.window_right = bm.window_right;
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
        const std::int64_t row = q_row0 - qoff[0] + sb * q_seq_rows;
        merge_state_inplace(acc_o + row * plan.o_row, acc_lse + row * p.h,
                            scratch.o + sb * np * plan.o_row, scratch.lse_rows.data(), np * p.h,
                            p.d_v);
      }
      if (progress) progress();
    };
    // Calls wait in `pending` so that whole query chunks stored back to back which see
    // the same key run fully become ONE call (zigzag: both query chunks of a rank see an
    // earlier rank's key chunk; one call packs those keys once). Pieces smaller than a
    // chunk (--piece-rows) are never joined. Merge order per row is unchanged: a
    // different call flushes the pending one first.
    struct Pending {
      std::int64_t q_row0 = 0, np = 0;
      int c0 = 0, c1 = 0;
      BlockMask bm;
      bool whole = false;  // a whole query chunk
      bool set = false;
    } pending;
    const auto flush = [&] {
      if (pending.set) run_call(pending.q_row0, pending.np, pending.c0, pending.c1, pending.bm);
      pending.set = false;
    };
    const auto enqueue = [&](std::int64_t q_row0, std::int64_t np, bool whole, int c0, int c1,
                             BlockMask bm) {
      if (pending.set && whole && pending.whole && bm.kind == BlockMask::kFull &&
          pending.bm.kind == BlockMask::kFull && pending.c0 == c0 && pending.c1 == c1 &&
          pending.q_row0 + pending.np == q_row0 && pending.np + np <= scratch.rows_cap) {
        pending.np += np;
        return;
      }
      flush();
      pending = Pending{q_row0, np, c0, c1, bm, whole, true};
    };
    std::int64_t q_lo = 0;
    std::vector<char> visible(k_chunks.size());
    for (const auto& cq : q_chunks) {
      for (std::int64_t i0 = 0; i0 < cq.count; i0 += piece) {
        const std::int64_t np = std::min(piece, cq.count - i0);
        const std::int64_t qp0 = cq.first + i0 * cq.stride;
        for (int c = 0; c < nk; ++c) {
          visible[c] =
              k_chunks[c].count > 0 && classify_block(qp0, np, k_chunks[c].first, k_chunks[c].count,
                                                      cq.stride, plan.wl, plan.wr)
                                               .kind != BlockMask::kHidden;
          if (!visible[c] && k_chunks[c].count > 0) ++st.skipped_blocks;
        }
        const auto call = [&](int c0, int c1, BlockMask bm) {
          enqueue(qoff[g.first] + q_lo + i0, np, np == cq.count, c0, c1, bm);
        };
        for (int c0 = 0; c0 < nk;) {
          if (!visible[c0]) {
            ++c0;
            continue;
          }
          int c1 = c0 + 1;
          while (c1 < nk && visible[c1]) ++c1;
          BlockMask bm;
          if (combine_mask(qp0, cq.stride, np, k_chunks.data() + c0, c1 - c0, plan.wl, plan.wr,
                           &bm)) {
            call(c0, c1, bm);
          } else {
            for (int c = c0; c < c1; ++c)
              call(c, c + 1,
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
}

void ring_write_lse(const RingPlan& plan, int rank, const float* acc_lse, float* lse) {
  const RingAttentionParams& p = *plan.p;
  const std::int64_t rows = plan.rows(rank);
  if (p.cu_seqlens) {
    for (std::int64_t row = 0; row < rows; ++row)
      for (int hh = 0; hh < p.h; ++hh) lse[hh * rows + row] = acc_lse[row * p.h + hh];
  } else {
    const std::int64_t n = rows / p.b;
    for (int bi = 0; bi < p.b; ++bi)
      for (std::int64_t i = 0; i < n; ++i)
        for (int hh = 0; hh < p.h; ++hh)
          lse[(static_cast<std::int64_t>(bi) * p.h + hh) * n + i] =
              acc_lse[(bi * n + i) * p.h + hh];
  }
}

}  // namespace detail
}  // namespace ringattn
