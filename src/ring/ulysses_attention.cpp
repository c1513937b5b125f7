// Ulysses x ring: all-to-all to head shards, the ring over the other grid axis, and
// all-to-all back (ulysses_attention.hpp).
#include "ringattn/ulysses_attention.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "ring/ring_blocks.hpp"
#include "ringattn/buffer_pool.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/error.hpp"

namespace ringattn {

namespace {

// Piece u of U of n rows: [n * u / U, n * (u + 1) / U).
std::int64_t piece_lo(std::int64_t n, int parts, int u) { return n * u / parts; }

// The grid geometry every rank derives from the params alone.
struct HybridPlan {
  int ranks = 1, ulysses = 1, ring = 1, g = 0, u = 0;
  int hq = 0;                      // query heads per rank after the all-to-all (h / U)
  int hk = 0;                      // K/V heads per rank after it (h_k / U, or 1 when replicated)
  int group = 1;                   // h / h_k of the whole problem
  std::vector<std::int64_t> lens;  // [b] tokens per sequence
  std::vector<std::int64_t> ring_len;  // [b] rows of ring shard g per sequence
  std::vector<std::int64_t> ring_off;  // [b + 1] their offsets in the ring tensor
  std::int64_t ring_rows() const { return ring_off.back(); }
  // Rows of piece `part` of sequence i, and where they start in the ring tensor.
  std::int64_t piece_rows(int i, int part) const {
    const auto n = ring_len[static_cast<std::size_t>(i)];
    return piece_lo(n, ulysses, part + 1) - piece_lo(n, ulysses, part);
  }
  std::int64_t piece_start(int i, int part) const {
    return ring_off[static_cast<std::size_t>(i)] +
           piece_lo(ring_len[static_cast<std::size_t>(i)], ulysses, part);
  }
  std::int64_t rows_of(int part) const {
    std::int64_t n = 0;
    for (std::size_t i = 0; i < lens.size(); ++i) n += piece_rows(static_cast<int>(i), part);
    return n;
  }
  // First K/V head of the query-head slice j.
  int kv_first(int j) const { return j * hq / group; }
};

HybridPlan make_plan(const RingAttentionParams& p, int ranks, int rank, int ulysses) {
  HybridPlan pl;
  pl.ranks = ranks;
  pl.ulysses = ulysses;
  pl.ring = ranks / ulysses;
  pl.g = rank / ulysses;
  pl.u = rank % ulysses;
  pl.hq = p.h / ulysses;
  pl.group = p.h / p.h_k;
  pl.hk = std::max(1, pl.hq / pl.group);
  for (int i = 0; i < p.b; ++i)
    pl.lens.push_back(p.cu_seqlens ? p.cu_seqlens[i + 1] - p.cu_seqlens[i] : p.s);
  pl.ring_off.assign(1, 0);
  for (auto len : pl.lens) {
    pl.ring_len.push_back(shard_length(p.layout, len, pl.ring, pl.g));
    pl.ring_off.push_back(pl.ring_off.back() + pl.ring_len.back());
  }
  return pl;
}

// Copies the heads [first, first + heads) (`width` elements each, esize bytes per
// element) of rows [row0, row0 + rows) of a [rows, h_all, width] tensor to dst, packed
// as [rows, heads, width]; returns the end of what it wrote.
std::byte* copy_slice(std::byte* dst, const void* src, std::int64_t row0, std::int64_t rows,
                      int h_all, int first, int heads, std::int64_t width, std::size_t esize) {
  const auto n = static_cast<std::size_t>(heads * width) * esize;
  const auto stride = static_cast<std::size_t>(h_all * width) * esize;
  const auto* s = static_cast<const std::byte*>(src) +
                  static_cast<std::size_t>((row0 * h_all + first) * width) * esize;
  for (std::int64_t r = 0; r < rows; ++r, s += stride, dst += n) std::memcpy(dst, s, n);
  return dst;
}

// The buffers of the hybrid forward, kept between calls: the ring shard's q, k, v, out
// and lse and one staging buffer. Fresh value-initialised buffers of this size (about
// 250 MB a rank at s = 16384, h = 8, d = 128) cost a page fault and a page clear per
// 4 KiB on every call.
BufferPool& ulysses_pool() {
  static BufferPool pool(6);
  return pool;
}

template <class T>
T* take(std::size_t count, BufferPool::Lease& lease) {
  if (!BufferPool::take(&ulysses_pool(), std::max<std::size_t>(count, 1) * sizeof(T), lease))
    throw std::bad_alloc();
  return static_cast<T*>(lease.data());
}

}  // namespace

void check_ulysses_grid(int ranks, int ulysses, int h, int h_k) {
  RA_CHECK_ARG(ulysses >= 1, "ulysses: degree U must be >= 1, got " << ulysses);
  RA_CHECK_ARG(ranks % ulysses == 0,
               "ulysses: degree U=" << ulysses << " must divide the number of ranks P=" << ranks);
  RA_CHECK_ARG(h % ulysses == 0,
               "ulysses: degree U=" << ulysses << " must divide the query heads h=" << h);
  RA_CHECK_ARG(h_k > 0 && (h_k % ulysses == 0 || ulysses % h_k == 0),
               "ulysses: degree U=" << ulysses << " and the K/V heads h_k=" << h_k
                                    << " must divide one another (U > h_k replicates K/V heads)");
}

std::int64_t hybrid_shard_length(ShardLayout layout, std::int64_t len, int ranks, int ulysses,
                                 int rank) {
  const int ring = ranks / ulysses, g = rank / ulysses, u = rank % ulysses;
  const std::int64_t n = shard_length(layout, len, ring, g);
  return piece_lo(n, ulysses, u + 1) - piece_lo(n, ulysses, u);
}

std::vector<std::int64_t> hybrid_shard_positions(ShardLayout layout, std::int64_t len, int ranks,
                                                 int ulysses, int rank) {
  const int ring = ranks / ulysses, g = rank / ulysses, u = rank % ulysses;
  const auto all = shard_positions(layout, len, ring, g);
  const auto n = static_cast<std::int64_t>(all.size());
  return {all.begin() + piece_lo(n, ulysses, u), all.begin() + piece_lo(n, ulysses, u + 1)};
}

void hybrid_attention_forward(const comm::Communicator& comm, const Engine& engine,
                              const RingAttentionParams& p, int ulysses, RingMode mode,
                              const RingOptions& options, HybridStats* stats) {
  const int ranks = comm.size(), rank = comm.rank();
  comm::run_collectively(comm, [&] { check_ulysses_grid(ranks, ulysses, p.h, p.h_k); });
  comm::check_consistent(comm, {{"ulysses", std::to_string(ulysses)}});
  detail::ring_validate(comm, p, ring_mode_name(mode));
  const double t_begin = detail::ring_now_s();
  if (stats) *stats = HybridStats{};
  if (ulysses == 1) {
    ring_attention(comm, engine, mode, p, options, stats ? &stats->ring_stats : nullptr);
    if (stats) {
      stats->ring = ranks;
      stats->total_s = detail::ring_now_s() - t_begin;
    }
    return;
  }

  const HybridPlan pl = make_plan(p, ranks, rank, ulysses);
  comm::Communicator ulysses_group(comm, pl.g, pl.u);  // the U ranks of ring position g
  comm::Communicator ring_group(comm, pl.u, pl.g);     // the R ranks of Ulysses index u
  const std::size_t es = dtype_size(p.dtype);
  const int b = p.b;
  const std::int64_t my_rows = pl.rows_of(pl.u), ring_rows = pl.ring_rows();

  double a2a_s = 0.0;
  std::int64_t a2a_bytes = 0;

  detail::run_or_abort(comm, "in Ulysses x ring", [&] {
    const auto U = static_cast<std::size_t>(ulysses);
    const auto hq = static_cast<std::size_t>(pl.hq);
    // Bytes of one row's head slice of q, k and v; floats of one row's slice of out.
    const auto q_n = hq * static_cast<std::size_t>(p.d) * es;
    const auto k_n = static_cast<std::size_t>(pl.hk * p.d) * es;
    const auto v_n = static_cast<std::size_t>(pl.hk * p.d_v) * es;
    const auto o_n = hq * static_cast<std::size_t>(p.d_v);
    const auto rows = [](std::int64_t n) { return static_cast<std::size_t>(n); };
    BufferPool::Lease q_lease, k_lease, v_lease, o_lease, lse_lease, stage_lease;
    auto* q_ring = take<std::byte>(rows(ring_rows) * q_n, q_lease);
    auto* k_ring = take<std::byte>(rows(ring_rows) * k_n, k_lease);
    auto* v_ring = take<std::byte>(rows(ring_rows) * v_n, v_lease);
    auto* out_ring = take<float>(rows(ring_rows) * o_n, o_lease);
    auto* lse_ring = take<float>(rows(ring_rows) * hq, lse_lease);
    // Staging, one slot per other rank (slot of rank j: j, or j - 1 above my index):
    // forward, my rows' slices for it ([my_rows, .] of q, then k, then v); backward,
    // its outputs for my rows [my_rows, hq, d_v] then their LSEs [my_rows, hq].
    const std::size_t fwd_slot = rows(my_rows) * (q_n + k_n + v_n);
    const std::size_t bwd_slot = rows(my_rows) * (o_n + hq) * sizeof(float);
    const std::size_t slot_bytes = (std::max(fwd_slot, bwd_slot) + 63) / 64 * 64;  // floats aligned
    auto* stage = take<std::byte>((U - 1) * slot_bytes, stage_lease);
    auto slot = [&](int j) {
      return stage + static_cast<std::size_t>(j < pl.u ? j : j - 1) * slot_bytes;
    };
    std::vector<std::int64_t> my_off(static_cast<std::size_t>(b) + 1, 0);  // my rows per sequence
    for (int s = 0; s < b; ++s)
      my_off[static_cast<std::size_t>(s) + 1] =
          my_off[static_cast<std::size_t>(s)] + pl.piece_rows(s, pl.u);
    auto mine = [&](int s) { return my_off[static_cast<std::size_t>(s)]; };

    // ---- 1. sequence shards -> head shards. Rank j needs my rows of its query heads
    // [j hq, (j + 1) hq) and K/V heads [kv_first(j), + hk). Each tensor's slice is
    // packed once, already in the ring layout [rows, heads, d], and goes as one message
    // per sequence that lands at the sequence's piece in j's q/k/v_ring (no unpacking);
    // my own slices are copied straight into my ring tensors while the messages move.
    double t0 = detail::ring_now_s();
    struct Tensor {
      const void* src;
      int h_all;
      std::int64_t width;
      std::byte* ring;
      std::size_t n;  // bytes of one row's slice
      int first(const HybridPlan& plan, int j, bool is_q) const {
        return is_q ? j * plan.hq : plan.kv_first(j);
      }
    };
    const Tensor tensors[3] = {{p.q, p.h, p.d, q_ring, q_n},
                               {p.k, p.h_k, p.d, k_ring, k_n},
                               {p.v, p.h_k, p.d_v, v_ring, v_n}};
    std::vector<comm::PeerBlock> sends, recvs;
    for (int j = 0; j < ulysses; ++j) {
      if (j == pl.u) continue;
      std::byte* w = slot(j);
      for (int t = 0; t < 3; ++t) {
        const Tensor& x = tensors[t];
        const int heads = t == 0 ? pl.hq : pl.hk;
        std::byte* packed = w;
        w = copy_slice(w, x.src, 0, my_rows, x.h_all, x.first(pl, j, t == 0), heads, x.width, es);
        for (int s = 0; s < b; ++s) {
          sends.push_back({j, packed + rows(mine(s)) * x.n, rows(pl.piece_rows(s, pl.u)) * x.n});
          recvs.push_back(
              {j, x.ring + rows(pl.piece_start(s, j)) * x.n, rows(pl.piece_rows(s, j)) * x.n});
        }
      }
    }
    comm::exchange_blocks(ulysses_group, sends, recvs, [&] {
      for (int t = 0; t < 3; ++t) {
        const Tensor& x = tensors[t];
        const int heads = t == 0 ? pl.hq : pl.hk;
        for (int s = 0; s < b; ++s)
          copy_slice(x.ring + rows(pl.piece_start(s, pl.u)) * x.n, x.src, mine(s),
                     pl.piece_rows(s, pl.u), x.h_all, x.first(pl, pl.u, t == 0), heads, x.width,
                     es);
      }
    });
    a2a_bytes += static_cast<std::int64_t>((U - 1) * fwd_slot);
    a2a_s += detail::ring_now_s() - t0;

    // ---- 2. the ring over the R ranks of this Ulysses index, on hq heads.
    RingAttentionParams rp = p;
    rp.q = q_ring;
    rp.k = k_ring;
    rp.v = v_ring;
    rp.out = out_ring;
    rp.lse = lse_ring;
    rp.h = pl.hq;
    rp.h_k = pl.hk;
    // Sinks of this rank's heads (applied once, by the ring, after its last merge).
    if (p.mask.sinks) rp.mask.sinks = p.mask.sinks + std::int64_t{pl.u} * pl.hq;
    rp.lse_layout = LseLayout::kApi;
    ring_attention(ring_group, engine, mode, rp, options, stats ? &stats->ring_stats : nullptr);

    // ---- 3. head shards -> sequence shards. To rank j: its rows (its pieces) of my
    // heads, the outputs straight from out_ring (one message per sequence) and the LSEs
    // packed [rows of j, hq]. From rank i: my rows of its heads into its staging slot,
    // then written to out / lse (my own heads are written while the messages move).
    t0 = detail::ring_now_s();
    // LSE of ring row t of sequence s (index within its ring shard), head hh:
    // dense [b, hq, n_g], varlen [hq, t_g].
    auto ring_lse = [&](int s, std::int64_t t, int hh) {
      if (p.cu_seqlens)
        return lse_ring[rows(hh * ring_rows + pl.ring_off[static_cast<std::size_t>(s)] + t)];
      return lse_ring[rows((s * pl.hq + hh) * pl.ring_len[0] + t)];
    };
    const std::int64_t my_n = b > 0 ? pl.piece_rows(0, pl.u) : 0;  // dense rows per sequence
    // My row r (row t of my piece of sequence s), query head `head` of the whole problem.
    auto put_lse = [&](int s, std::int64_t t, std::int64_t r, std::int64_t head, float x) {
      if (p.lse_layout == LseLayout::kRows) {
        p.lse[r * p.h + head] = x;
      } else if (p.cu_seqlens) {
        p.lse[head * my_rows + r] = x;
      } else {
        p.lse[(s * p.h + head) * my_n + t] = x;
      }
    };
    // Rows of a piece of sequence s (ring rows from `start`, my rows from r0) to out:
    // outputs from `o` ([rows, hq, d_v]) for query heads [i hq, (i + 1) hq).
    auto put_out = [&](const float* o, std::int64_t r0, std::int64_t n, int i) {
      for (std::int64_t r = r0; r < r0 + n; ++r, o += o_n)
        std::copy(o, o + o_n, p.out + (r * p.h + std::int64_t{i} * pl.hq) * p.d_v);
    };
    std::vector<float> lse_send(p.lse ? rows(ring_rows) * hq : 0);
    sends.clear();
    recvs.clear();
    float* ls = lse_send.data();
    for (int j = 0; j < ulysses; ++j) {
      if (j == pl.u) continue;
      float* lse_j = ls;
      for (int s = 0; s < b; ++s) {
        const std::int64_t start = pl.piece_start(s, j), n = pl.piece_rows(s, j);
        sends.push_back({j, out_ring + rows(start) * o_n, rows(n) * o_n * sizeof(float)});
        const std::int64_t off = start - pl.ring_off[static_cast<std::size_t>(s)];
        if (p.lse) {
          for (std::int64_t t = 0; t < n; ++t)
            for (int hh = 0; hh < pl.hq; ++hh) *ls++ = ring_lse(s, off + t, hh);
        }
        recvs.push_back({j, reinterpret_cast<float*>(slot(j)) + rows(mine(s)) * o_n,
                         rows(pl.piece_rows(s, pl.u)) * o_n * sizeof(float)});
      }
      if (p.lse) {
        sends.push_back({j, lse_j, static_cast<std::size_t>(ls - lse_j) * sizeof(float)});
        recvs.push_back({j, reinterpret_cast<float*>(slot(j)) + rows(my_rows) * o_n,
                         rows(my_rows) * hq * sizeof(float)});
      }
    }
    comm::exchange_blocks(ulysses_group, sends, recvs, [&] {
      for (int s = 0; s < b; ++s) {
        const std::int64_t start = pl.piece_start(s, pl.u), n = pl.piece_rows(s, pl.u);
        put_out(out_ring + rows(start) * o_n, mine(s), n, pl.u);
        if (!p.lse) continue;
        const std::int64_t off = start - pl.ring_off[static_cast<std::size_t>(s)];
        for (std::int64_t t = 0; t < n; ++t)
          for (int hh = 0; hh < pl.hq; ++hh)
            put_lse(s, t, mine(s) + t, std::int64_t{pl.u} * pl.hq + hh, ring_lse(s, off + t, hh));
      }
    });
    for (int i = 0; i < ulysses; ++i) {
      if (i == pl.u) continue;
      const auto* o = reinterpret_cast<const float*>(slot(i));
      put_out(o, 0, my_rows, i);
      if (!p.lse) continue;
      const float* l = o + rows(my_rows) * o_n;
      for (int s = 0; s < b; ++s)
        for (std::int64_t t = 0; t < pl.piece_rows(s, pl.u); ++t)
          for (int hh = 0; hh < pl.hq; ++hh)
            put_lse(s, t, mine(s) + t, std::int64_t{i} * pl.hq + hh, *l++);
    }
    for (const auto& blk : sends) a2a_bytes += static_cast<std::int64_t>(blk.bytes);
    a2a_s += detail::ring_now_s() - t0;
  });
  if (stats) {
    stats->ulysses = ulysses;
    stats->ring = pl.ring;
    stats->alltoall_s = a2a_s;
    stats->alltoall_bytes = a2a_bytes;
    stats->total_s = detail::ring_now_s() - t_begin;
  }
}

}  // namespace ringattn
