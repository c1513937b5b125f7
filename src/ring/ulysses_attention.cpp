// Ulysses x ring: all-to-all to head shards, the ring over the other grid axis, and
// all-to-all back (ulysses_attention.hpp).
#include "ringattn/ulysses_attention.hpp"

#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "ring/ring_blocks.hpp"
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

// Copies `heads` heads of `width` elements starting at head `first` of row `row` of a
// [rows, h_all, width] tensor to dst (esize bytes per element).
inline std::byte* copy_heads(std::byte* dst, const void* src, std::int64_t row, int h_all,
                             int first, int heads, std::int64_t width, std::size_t esize) {
  const auto* s = static_cast<const std::byte*>(src) +
                  static_cast<std::size_t>((row * h_all + first) * width) * esize;
  const auto n = static_cast<std::size_t>(heads * width) * esize;
  std::memcpy(dst, s, n);
  return dst + n;
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
  const std::int64_t in_row = std::int64_t{pl.hq} * p.d + std::int64_t{pl.hk} * (p.d + p.d_v);
  const std::int64_t out_row = std::int64_t{pl.hq} * (p.d_v + 1);  // fp32 out + lse

  double a2a_s = 0.0;
  std::int64_t a2a_bytes = 0;

  detail::run_or_abort(comm, "in Ulysses x ring", [&] {
    std::vector<std::byte> q_ring(static_cast<std::size_t>(ring_rows * pl.hq * p.d) * es);
    std::vector<std::byte> k_ring(static_cast<std::size_t>(ring_rows * pl.hk * p.d) * es);
    std::vector<std::byte> v_ring(static_cast<std::size_t>(ring_rows * pl.hk * p.d_v) * es);
    std::vector<float> out_ring(static_cast<std::size_t>(ring_rows * pl.hq * p.d_v));
    std::vector<float> lse_ring(static_cast<std::size_t>(ring_rows * pl.hq));
    // ---- 1. sequence shards -> head shards. Block for rank j: my rows, query heads
    // [j hq, (j + 1) hq) then K/V heads [kv_first(j), + hk), row by row.
    double t0 = detail::ring_now_s();
    std::vector<std::size_t> send_bytes(static_cast<std::size_t>(ulysses)),
        recv_bytes(static_cast<std::size_t>(ulysses));
    for (int j = 0; j < ulysses; ++j) {
      send_bytes[static_cast<std::size_t>(j)] = static_cast<std::size_t>(my_rows * in_row) * es;
      recv_bytes[static_cast<std::size_t>(j)] =
          static_cast<std::size_t>(pl.rows_of(j) * in_row) * es;
    }
    std::vector<std::byte> send(static_cast<std::size_t>(ulysses) * send_bytes[0]);
    std::byte* w = send.data();
    for (int j = 0; j < ulysses; ++j) {
      for (std::int64_t r = 0; r < my_rows; ++r) {
        w = copy_heads(w, p.q, r, p.h, j * pl.hq, pl.hq, p.d, es);
        w = copy_heads(w, p.k, r, p.h_k, pl.kv_first(j), pl.hk, p.d, es);
        w = copy_heads(w, p.v, r, p.h_k, pl.kv_first(j), pl.hk, p.d_v, es);
      }
    }
    std::size_t recv_total = 0;
    for (auto n : recv_bytes) recv_total += n;
    std::vector<std::byte> recv(recv_total);
    comm::alltoall_bytes(ulysses_group, send.data(), send_bytes, recv.data(), recv_bytes);
    // Rows from rank i are its pieces of every sequence, in sequence order.
    const std::byte* rd = recv.data();
    const auto q_n = static_cast<std::size_t>(pl.hq * p.d) * es;
    const auto k_n = static_cast<std::size_t>(pl.hk * p.d) * es;
    const auto v_n = static_cast<std::size_t>(pl.hk * p.d_v) * es;
    for (int i = 0; i < ulysses; ++i) {
      for (int s = 0; s < b; ++s) {
        const std::int64_t start = pl.piece_start(s, i);
        for (std::int64_t t = 0; t < pl.piece_rows(s, i); ++t) {
          const auto row = static_cast<std::size_t>(start + t);
          std::memcpy(q_ring.data() + row * q_n, rd, q_n);
          std::memcpy(k_ring.data() + row * k_n, rd + q_n, k_n);
          std::memcpy(v_ring.data() + row * v_n, rd + q_n + k_n, v_n);
          rd += q_n + k_n + v_n;
        }
      }
    }
    a2a_bytes += static_cast<std::int64_t>(send.size() - send_bytes[0]);
    a2a_s += detail::ring_now_s() - t0;

    // ---- 2. the ring over the R ranks of this Ulysses index, on hq heads.
    RingAttentionParams rp = p;
    rp.q = q_ring.data();
    rp.k = k_ring.data();
    rp.v = v_ring.data();
    rp.out = out_ring.data();
    rp.lse = lse_ring.data();
    rp.h = pl.hq;
    rp.h_k = pl.hk;
    rp.lse_layout = LseLayout::kApi;
    ring_attention(ring_group, engine, mode, rp, options, stats ? &stats->ring_stats : nullptr);

    // ---- 3. head shards -> sequence shards: to rank j its rows (its pieces) of my
    // heads, each row hq x d_v outputs then hq LSEs (fp32).
    t0 = detail::ring_now_s();
    for (int j = 0; j < ulysses; ++j) {
      send_bytes[static_cast<std::size_t>(j)] =
          static_cast<std::size_t>(pl.rows_of(j) * out_row) * sizeof(float);
      recv_bytes[static_cast<std::size_t>(j)] =
          static_cast<std::size_t>(my_rows * out_row) * sizeof(float);
    }
    // LSE of ring row `row` (sequence s, index t within its ring shard), head hh:
    // dense [b, hq, n_g], varlen [hq, t_g].
    auto ring_lse = [&](int s, std::int64_t t, int hh) {
      if (p.cu_seqlens)
        return lse_ring[static_cast<std::size_t>(hh * ring_rows +
                                                 pl.ring_off[static_cast<std::size_t>(s)] + t)];
      const std::int64_t n = pl.ring_len[0];
      return lse_ring[static_cast<std::size_t>((s * pl.hq + hh) * n + t)];
    };
    std::vector<float> send_o(static_cast<std::size_t>(ring_rows * out_row));
    float* wo = send_o.data();
    for (int j = 0; j < ulysses; ++j) {
      for (int s = 0; s < b; ++s) {
        const std::int64_t start = pl.piece_start(s, j);
        const std::int64_t off = start - pl.ring_off[static_cast<std::size_t>(s)];
        for (std::int64_t t = 0; t < pl.piece_rows(s, j); ++t) {
          const float* src = out_ring.data() + (start + t) * pl.hq * p.d_v;
          wo = std::copy(src, src + pl.hq * p.d_v, wo);
          for (int hh = 0; hh < pl.hq; ++hh) *wo++ = ring_lse(s, off + t, hh);
        }
      }
    }
    std::vector<float> recv_o(static_cast<std::size_t>(ulysses * my_rows * out_row));
    comm::alltoall_bytes(ulysses_group, send_o.data(), send_bytes, recv_o.data(), recv_bytes);
    // From rank i: my rows (sequence order) for query heads [i hq, (i + 1) hq).
    const std::int64_t my_n = b > 0 ? pl.piece_rows(0, pl.u) : 0;  // dense rows per sequence
    const float* ro = recv_o.data();
    for (int i = 0; i < ulysses; ++i) {
      std::int64_t r = 0;
      for (int s = 0; s < b; ++s) {
        for (std::int64_t t = 0; t < pl.piece_rows(s, pl.u); ++t, ++r) {
          std::copy(ro, ro + pl.hq * p.d_v, p.out + (r * p.h + i * pl.hq) * p.d_v);
          ro += pl.hq * p.d_v;
          for (int hh = 0; hh < pl.hq; ++hh, ++ro) {
            if (!p.lse) continue;
            const std::int64_t head = i * pl.hq + hh;
            if (p.lse_layout == LseLayout::kRows) {
              p.lse[r * p.h + head] = *ro;
            } else if (p.cu_seqlens) {
              p.lse[head * my_rows + r] = *ro;
            } else {
              p.lse[(s * p.h + head) * my_n + t] = *ro;
            }
          }
        }
      }
    }
    a2a_bytes += static_cast<std::int64_t>((send_o.size() * sizeof(float)) -
                                           send_bytes[static_cast<std::size_t>(pl.u)]);
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
