#include "ringattn/ring_attention.hpp"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <sstream>

#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/ring_exchange.hpp"
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

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Length of sequence i.
std::int64_t seq_len(const RingAttentionParams& p, int i) {
  return p.cu_seqlens ? p.cu_seqlens[i + 1] - p.cu_seqlens[i] : p.s;
}

// Local checks on this rank's arguments (the ranks then agree on the outcome).
void validate_local(const RingAttentionParams& p, int ranks, int rank) {
  RA_CHECK_ARG_GT(p.b, 0, "ring: batch size b");
  RA_CHECK_ARG_GT(p.h, 0, "ring: query heads h");
  RA_CHECK_ARG_GT(p.h_k, 0, "ring: key/value heads h_k");
  RA_CHECK_ARG_EQ(p.h % p.h_k, 0, "ring: h must be a multiple of h_k");
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

comm::Fields config_fields(const RingAttentionParams& p, int ranks) {
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
          {"scale", str(p.mask.scale)}};
}

// Sequences that share one kernel call: dense batches form one group (same length,
// same chunk geometry on every rank); varlen sequences are one group each.
struct Group {
  int first = 0;         // first sequence
  int count = 1;         // sequences in the group
  std::int64_t len = 0;  // tokens per sequence
};

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

void ring_attention_forward(const comm::Communicator& comm, const Engine& engine,
                            const RingAttentionParams& p, const RingOptions& options,
                            RingStats* stats) {
  const int ranks = comm.size();
  const int rank = comm.rank();
  comm::run_collectively(comm, [&] { validate_local(p, ranks, rank); });
  comm::check_consistent(comm, config_fields(p, ranks));

  // Row offsets of every sequence in every rank's shard: offsets[r][i].
  std::vector<std::vector<std::int64_t>> offsets(static_cast<std::size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    auto& o = offsets[static_cast<std::size_t>(r)];
    o.assign(static_cast<std::size_t>(p.b) + 1, 0);
    for (int i = 0; i < p.b; ++i)
      o[static_cast<std::size_t>(i) + 1] =
          o[static_cast<std::size_t>(i)] + shard_length(p.layout, seq_len(p, i), ranks, r);
  }
  std::vector<Group> groups;
  if (p.cu_seqlens) {
    for (int i = 0; i < p.b; ++i) groups.push_back(Group{i, 1, seq_len(p, i)});
  } else {
    groups.push_back(Group{0, p.b, p.s});
  }

  const std::size_t esize = dtype_size(p.dtype);
  const std::int64_t k_row = std::int64_t{p.h_k} * p.d;    // elements per token of k
  const std::int64_t v_row = std::int64_t{p.h_k} * p.d_v;  // elements per token of v
  const std::int64_t q_row = std::int64_t{p.h} * p.d;
  const std::int64_t o_row = std::int64_t{p.h} * p.d_v;
  std::int64_t max_rows = 0;
  for (int r = 0; r < ranks; ++r) max_rows = std::max(max_rows, offsets[r][p.b]);
  const std::int64_t my_rows = offsets[rank][p.b];
  const std::size_t max_bytes = static_cast<std::size_t>(max_rows * (k_row + v_row)) * esize;

  // Window of the global self-attention (causal = right window 0).
  const int wl = p.mask.window_left;
  const int wr = p.mask.causal ? 0 : p.mask.window_right;

  // Accumulators: out [rows, h, d_v] (the caller's buffer), lse_acc [rows, h].
  std::fill(p.out, p.out + my_rows * o_row, 0.0f);
  std::vector<float> lse_acc(static_cast<std::size_t>(my_rows * p.h), kNegInf);

  // Scratch for one kernel call: out [nb, piece, h, d_v], lse [nb, h, piece].
  std::int64_t max_chunk = 0;
  int max_nb = 1;
  for (const auto& g : groups) {
    max_nb = std::max(max_nb, g.count);
    for (const auto& c : shard_chunks(p.layout, g.len, ranks, rank))
      max_chunk = std::max(max_chunk, c.count);
  }
  std::int64_t piece = options.piece_rows > 0 ? options.piece_rows : max_chunk;
  if (options.piece_rows <= 0 && options.progress && ranks > 1)
    piece = std::max<std::int64_t>(64, (max_chunk + 7) / 8);
  piece = std::max<std::int64_t>(1, std::min(piece, std::max<std::int64_t>(1, max_chunk)));
  std::vector<float> tmp_o(static_cast<std::size_t>(max_nb * piece * o_row));
  std::vector<float> tmp_lse(static_cast<std::size_t>(max_nb * piece * p.h));
  std::vector<float> lse_t(static_cast<std::size_t>(piece * p.h));
  std::vector<std::int64_t> shifts(static_cast<std::size_t>(max_nb));

  comm::RingExchange exchange(comm, max_bytes);
  if (my_rows > 0) {
    std::memcpy(exchange.current(), p.k, static_cast<std::size_t>(my_rows * k_row) * esize);
    std::memcpy(exchange.current() + static_cast<std::size_t>(my_rows * k_row) * esize, p.v,
                static_cast<std::size_t>(my_rows * v_row) * esize);
  }
  if (stats) {
    stats->steps.assign(static_cast<std::size_t>(ranks), RingStepStats{});
    stats->total_s = 0.0;
  }
  const auto* q_bytes = static_cast<const std::byte*>(p.q);
  const double t_begin = now_s();

  try {
    // Pass-KV ring. At step t rank r holds the K/V shard of src = (r - t) mod P; it
    // starts passing that shard on to r+1 (and receiving the next from r-1), then
    // for every group of sequences, every (query chunk, key chunk) pair and every
    // piece of `piece` query rows it classifies the block against the global mask:
    // hidden blocks are skipped, fully visible ones run unmasked, the rest run with
    // the kernel's mask shifted to the block's diagonal. Each partial (o, lse) is
    // merged into the rank's accumulators (SPEC.md section 5); between pieces an
    // MPI_Testall keeps the transfer moving. Bytes per step: max_bytes (the largest
    // K+V shard); P-1 transfers in all.
    for (int t = 0; t < ranks; ++t) {
      const int src = (rank - t + ranks) % ranks;
      const bool send = t < ranks - 1;
      if (send) exchange.start();
      const double t0 = now_s();
      RingStepStats st;
      const std::int64_t src_rows = offsets[src][p.b];
      const std::byte* k_bytes = exchange.current();
      const std::byte* v_bytes = k_bytes + static_cast<std::size_t>(src_rows * k_row) * esize;

      for (const auto& g : groups) {
        const auto q_chunks = shard_chunks(p.layout, g.len, ranks, rank);
        const auto k_chunks = shard_chunks(p.layout, g.len, ranks, src);
        // Row strides between sequences of a dense group (each rank's n_r / n_src).
        const std::int64_t q_seq_rows = offsets[rank][g.first + 1] - offsets[rank][g.first];
        const std::int64_t k_seq_rows = offsets[src][g.first + 1] - offsets[src][g.first];
        std::int64_t q_lo = 0;
        for (const auto& cq : q_chunks) {
          std::int64_t k_lo = 0;
          for (const auto& ck : k_chunks) {
            for (std::int64_t i0 = 0; i0 < cq.count && ck.count > 0; i0 += piece) {
              const std::int64_t np = std::min(piece, cq.count - i0);
              const BlockMask bm = classify_block(cq.first + i0 * cq.stride, np, ck.first, ck.count,
                                                  cq.stride, wl, wr);
              if (bm.kind == BlockMask::kHidden) {
                ++st.skipped_blocks;
                continue;
              }
              const std::int64_t q_row0 = offsets[rank][g.first] + q_lo + i0;
              const std::int64_t k_row0 = offsets[src][g.first] + k_lo;
              FwdParams f;
              f.dtype = p.dtype;
              f.out_dtype = DType::kF32;
              f.q = q_bytes + static_cast<std::size_t>(q_row0 * q_row) * esize;
              f.k = k_bytes + static_cast<std::size_t>(k_row0 * k_row) * esize;
              f.v = v_bytes + static_cast<std::size_t>(k_row0 * v_row) * esize;
              f.out = tmp_o.data();
              f.lse = tmp_lse.data();
              f.q_batch_stride = q_seq_rows * q_row;
              f.q_row_stride = q_row;
              f.q_head_stride = p.d;
              f.k_batch_stride = k_seq_rows * k_row;
              f.k_row_stride = k_row;
              f.k_head_stride = p.d;
              f.v_batch_stride = k_seq_rows * v_row;
              f.v_row_stride = v_row;
              f.v_head_stride = p.d_v;
              f.out_batch_stride = np * o_row;
              f.out_row_stride = o_row;
              f.out_head_stride = p.d_v;
              f.b = g.count;
              f.s_q = static_cast<int>(np);
              f.s_k = static_cast<int>(ck.count);
              f.h = p.h;
              f.h_k = p.h_k;
              f.d = p.d;
              f.d_v = p.d_v;
              f.mask.scale = p.mask.scale;
              f.mask.softcap = p.mask.softcap;
              if (bm.kind == BlockMask::kPartial) {
                std::fill(shifts.begin(), shifts.begin() + g.count, bm.shift);
                f.mask.mask_shift = shifts.data();
                f.mask.window_left = bm.window_left;
                f.mask.window_right = bm.window_right;
              }
              engine.forward(f);
              ++st.kernel_calls;
              // Merge each sequence's rows: tmp lse [h, np] -> [np, h] to match rows.
              for (int sb = 0; sb < g.count; ++sb) {
                const float* l = tmp_lse.data() + static_cast<std::int64_t>(sb) * p.h * np;
                for (std::int64_t i = 0; i < np; ++i)
                  for (int hh = 0; hh < p.h; ++hh) lse_t[i * p.h + hh] = l[hh * np + i];
                const std::int64_t row = q_row0 + sb * q_seq_rows;
                merge_state_inplace(p.out + row * o_row, lse_acc.data() + row * p.h,
                                    tmp_o.data() + sb * np * o_row, lse_t.data(), np * p.h, p.d_v);
              }
              if (send && options.progress) exchange.progress();
            }
            k_lo += ck.count;
          }
          q_lo += cq.count;
        }
      }
      const double t1 = now_s();
      st.compute_s = t1 - t0;
      if (send) {
        exchange.finish();
        st.wait_s = now_s() - t1;
        st.bytes = static_cast<std::int64_t>(max_bytes);
      }
      if (stats) stats->steps[static_cast<std::size_t>(t)] = st;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn: rank %d: fatal error during the ring: %s\n", rank, e.what());
    std::fflush(stderr);
    MPI_Abort(comm.get(), 1);
  }

  // LSE out: dense [b, h, n_r], varlen [h, t_r], from lse_acc [rows, h].
  if (p.lse) {
    if (p.cu_seqlens) {
      for (std::int64_t row = 0; row < my_rows; ++row)
        for (int hh = 0; hh < p.h; ++hh) p.lse[hh * my_rows + row] = lse_acc[row * p.h + hh];
    } else {
      const std::int64_t n = my_rows / p.b;
      for (int bi = 0; bi < p.b; ++bi)
        for (std::int64_t i = 0; i < n; ++i)
          for (int hh = 0; hh < p.h; ++hh)
            p.lse[(static_cast<std::int64_t>(bi) * p.h + hh) * n + i] =
                lse_acc[(bi * n + i) * p.h + hh];
    }
  }
  if (stats) stats->total_s = now_s() - t_begin;
}

}  // namespace ringattn
