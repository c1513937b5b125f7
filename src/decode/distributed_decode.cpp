#include "ringattn/distributed_decode.hpp"

#include <mpi.h>

#include <cstring>
#include <sstream>
#include <vector>

#include "ring/block_mask.hpp"
#include "ring/ring_blocks.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/error.hpp"
#include "ringattn/merge_state.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/softmax_state.hpp"
#include "ringattn/version.hpp"

namespace ringattn {

namespace {

// MPI reduction op: each element is one row's record [o (d_v floats), lse]; merges
// `in` into `inout` with the one merge of docs/semantics.md section 5.
void merge_records(void* in, void* inout, int* len, MPI_Datatype* type) {
  int bytes = 0;
  MPI_Type_size(*type, &bytes);
  const int d_v = bytes / static_cast<int>(sizeof(float)) - 1;
  auto* a = static_cast<float*>(inout);
  const auto* b = static_cast<const float*>(in);
  for (int i = 0; i < *len; ++i) {
    float* ra = a + static_cast<std::int64_t>(i) * (d_v + 1);
    const float* rb = b + static_cast<std::int64_t>(i) * (d_v + 1);
    merge_state_inplace(ra, ra + d_v, rb, rb + d_v, 1, d_v);
  }
}

}  // namespace

void merge_across_ranks(const comm::Communicator& comm, float* records, std::int64_t rows, int d_v,
                        int root) {
  // Tree reduction with the merge as MPI operation (allreduce or reduce to root).
  const comm::UserOp op(&merge_records, true);
  const comm::FloatRecordType type(d_v + 1);
  RA_CHECK_ARG_LE(rows, std::int64_t{INT32_MAX}, "merge across ranks: rows");
  if (root < 0) {
    comm::allreduce(comm, records, static_cast<int>(rows), type.get(), op.get());
  } else {
    comm::reduce(comm, root, records, static_cast<int>(rows), type.get(), op.get());
  }
}

std::int64_t decode_shard_first(std::int64_t s_cache, int ranks, int rank) {
  return rank * s_cache / ranks;
}
std::int64_t decode_shard_length(std::int64_t s_cache, int ranks, int rank) {
  return decode_shard_first(s_cache, ranks, rank + 1) - decode_shard_first(s_cache, ranks, rank);
}

void distributed_decode(const comm::Communicator& comm, const Engine& engine,
                        const DecodeParams& p) {
  const int P = comm.size(), rank = comm.rank();
  comm::run_collectively(comm, [&] {
    RA_CHECK_ARG_GT(p.b, 0, "decode: batch size b");
    RA_CHECK_ARG_GT(p.s_q, 0, "decode: query rows s_q");
    RA_CHECK_ARG(p.h > 0 && p.h_k > 0 && p.h % p.h_k == 0,
                 "decode: heads h = " << p.h << " must be a positive multiple of h_k = " << p.h_k);
    RA_CHECK_ARG(p.d > 0 && p.d <= kMaxHeadDim && p.d_v > 0 && p.d_v <= kMaxHeadDim,
                 "decode: head dims d = " << p.d << ", d_v = " << p.d_v << " must be in [1, "
                                          << kMaxHeadDim << "]");
    RA_CHECK_ARG(p.s_cache >= P, "decode: cache length "
                                     << p.s_cache << " is smaller than the number of ranks " << P);
    RA_CHECK(p.mask.mask_shift == nullptr, UnsupportedError,
             "decode: mask.mask_shift is set by the decode itself and must be nullptr");
    RA_CHECK(
        p.mask.chunk_q_pos == nullptr && p.mask.chunk_k_pos == nullptr && p.mask.chunk_stride == 1,
        UnsupportedError,
        "decode: mask.chunk_q_pos / chunk_k_pos / chunk_stride are set by the decode itself "
        "(nullptr, nullptr, 1); attention_chunk alone selects chunked attention");
    RA_CHECK_ARG(p.root >= -1 && p.root < P,
                 "decode: root " << p.root << " outside [-1, " << P << ")");
    RA_CHECK_ARG(p.q && p.k_cache && p.v_cache, "decode: q, k_cache and v_cache must be non-null");
    RA_CHECK_ARG(p.out || (p.root >= 0 && rank != p.root), "decode: out must be non-null");
    validate_mask(p.mask, p.h);
  });
  const auto str = [](auto v) {
    std::ostringstream os;
    os << v;
    return os.str();
  };
  comm::check_consistent(comm,
                         {{"version", version()},
                          {"ranks", str(P)},
                          {"dtype", dtype_name(p.dtype)},
                          {"batch", str(p.b)},
                          {"query rows", str(p.s_q)},
                          {"cache length", str(p.s_cache)},
                          {"heads", str(p.h)},
                          {"kv heads", str(p.h_k)},
                          {"head dim", str(p.d)},
                          {"v head dim", str(p.d_v)},
                          {"causal", p.mask.causal ? "yes" : "no"},
                          {"window", str(p.mask.window_left) + "," + str(p.mask.window_right)},
                          {"attention chunk", str(p.mask.attention_chunk)},
                          {"softcap", str(p.mask.softcap)},
                          {"scale", str(p.mask.scale)},
                          {"sinks", detail::sinks_fingerprint(p.mask.sinks, p.h)},
                          {"root", str(p.root)}});

  const std::int64_t k0 = decode_shard_first(p.s_cache, P, rank);
  const std::int64_t n = decode_shard_length(p.s_cache, P, rank);
  const std::int64_t rows = std::int64_t{p.b} * p.s_q * p.h;
  const int rec = p.d_v + 1;
  // Local partial: out [b, s_q, h, d_v] and lse [b, h, s_q] from the kernel, then
  // packed as records [b, s_q, h][o, lse] for the reduction.
  std::vector<float> o(static_cast<std::size_t>(rows * p.d_v), 0.0f);
  std::vector<float> l(static_cast<std::size_t>(rows), kNegInf);
  // The query rows sit at positions q0 + i of the whole cache, this rank's keys at
  // k0 + j. Keys no row sees (window, attention_chunk: only the chunks of the query rows
  // matter, so a long cache reads one or two chunks' keys) are trimmed off; a shard with
  // none skips the kernel and contributes the empty state.
  const std::int64_t q0 = p.s_cache - p.s_q;
  const int wr = p.mask.causal ? 0 : p.mask.window_right;
  const detail::KeySpan span =
      detail::visible_key_span(q0, p.s_q, k0, n, 1, p.mask.window_left, wr, p.mask.attention_chunk);
  if (!span.empty()) {
    const std::int64_t kb = k0 + span.lo, nk = span.hi - span.lo + 1;  // keys of the call
    const BlockMask bm = classify_block(q0, p.s_q, kb, nk, 1, p.mask.window_left, wr);
    std::vector<std::int64_t> shifts(static_cast<std::size_t>(p.b), bm.shift);
    std::vector<std::int64_t> q_pos(static_cast<std::size_t>(p.b), q0);
    std::vector<std::int64_t> k_pos(static_cast<std::size_t>(p.b), kb);
    const std::size_t es = dtype_size(p.dtype);
    FwdParams f;
    f.dtype = p.dtype;
    f.q = p.q;
    f.k = static_cast<const std::byte*>(p.k_cache) +
          static_cast<std::size_t>(span.lo * p.h_k * p.d) * es;
    f.v = static_cast<const std::byte*>(p.v_cache) +
          static_cast<std::size_t>(span.lo * p.h_k * p.d_v) * es;
    f.out = o.data();
    f.lse = l.data();
    f.b = p.b;
    f.s_q = p.s_q;
    f.s_k = static_cast<int>(nk);
    f.h = p.h;
    f.h_k = p.h_k;
    f.d = p.d;
    f.d_v = p.d_v;
    set_contiguous_strides(f);  // q [b, s_q, h, d], k/v [b, nk, h_k, d(_v)]
    // The shard's rows are n apart per sequence, not nk.
    f.k_batch_stride = n * p.h_k * p.d;
    f.v_batch_stride = n * p.h_k * p.d_v;
    f.mask.scale = p.mask.scale;
    f.mask.softcap = p.mask.softcap;
    if (bm.kind == BlockMask::kPartial) {
      f.mask.mask_shift = shifts.data();
      f.mask.window_left = bm.window_left;
      f.mask.window_right = bm.window_right;
    }
    if (p.mask.attention_chunk > 0) {
      f.mask.attention_chunk = p.mask.attention_chunk;
      f.mask.chunk_q_pos = q_pos.data();
      f.mask.chunk_k_pos = k_pos.data();
    }
    engine.forward(f);
  }
  std::vector<float> recs(static_cast<std::size_t>(rows * rec));
  for (int bi = 0; bi < p.b; ++bi)
    for (int i = 0; i < p.s_q; ++i)
      for (int hh = 0; hh < p.h; ++hh) {
        const std::int64_t r = (std::int64_t{bi} * p.s_q + i) * p.h + hh;
        std::memcpy(&recs[r * rec], &o[r * p.d_v], sizeof(float) * p.d_v);
        recs[r * rec + p.d_v] = l[(std::int64_t{bi} * p.h + hh) * p.s_q + i];
      }

  merge_across_ranks(comm, recs.data(), rows, p.d_v, p.root);
  if (p.root >= 0 && rank != p.root) return;
  // Attention sinks: once, on the fully reduced rows (records [b, s_q, h][o, lse]).
  apply_sinks(recs.data(), rec, recs.data() + p.d_v, rec, p.mask.sinks, rows, p.h, p.d_v);
  for (int bi = 0; bi < p.b; ++bi)
    for (int i = 0; i < p.s_q; ++i)
      for (int hh = 0; hh < p.h; ++hh) {
        const std::int64_t r = (std::int64_t{bi} * p.s_q + i) * p.h + hh;
        std::memcpy(&p.out[r * p.d_v], &recs[r * rec], sizeof(float) * p.d_v);
        if (p.lse) p.lse[(std::int64_t{bi} * p.h + hh) * p.s_q + i] = recs[r * rec + p.d_v];
      }
}

}  // namespace ringattn
