// `ringattn ring` (under mpirun): ring attention across the ranks of MPI_COMM_WORLD.
//   files:     --q [b, s, h, d] --k [b, s, h_k, d] --v [b, s, h_k, d_v] read on rank 0
//              (varlen: [total, h, *] with --cu-seqlens [b+1]), scattered by --layout;
//              --out [b, s, h, d_v] / [total, h, d_v] and --lse [b, h, s] / [h, total]
//              gathered on rank 0 in the original token order (fp32, natural-log LSE).
//   synthetic: --batch --seqlen (or --seqlens a,b,c for varlen) --heads --kv-heads --dim
//              --seed; every rank generates only its own tokens.
// Always prints one result line on rank 0 (or a JSON object with --json).
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/args.hpp"
#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/ulysses_attention.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: mpirun -np N ringattn ring (--q Q.npy --k K.npy --v V.npy [--out O.npy] [--lse "
    "L.npy]\n"
    "                                  | --seqlen S [--batch B] [--heads H] ...) [options]\n"
    "\n"
    "Ring attention across MPI ranks: --mode pass-kv (K/V travel, default) or pass-q (queries\n"
    "travel, K/V stay). Files are read and written on rank 0 only.";

// The problem's shape (from the files' headers, or the synthetic options).
struct Problem {
  int b = 1, h = 8, h_k = 0, d = 128, d_v = 0;
  std::int64_t s = 0;
  std::vector<std::int32_t> cu;  // varlen offsets [b+1] or empty
  std::int64_t len(int i) const { return cu.empty() ? s : cu[i + 1] - cu[i]; }
  std::int64_t base(int i) const { return cu.empty() ? i * s : cu[i]; }
  std::int64_t total() const { return cu.empty() ? b * s : cu.back(); }
  // Elements per token row of q, k, v and the output.
  std::int64_t q_row() const { return std::int64_t{h} * d; }
  std::int64_t k_row() const { return std::int64_t{h_k} * d; }
  std::int64_t v_row() const { return std::int64_t{h_k} * d_v; }
  std::int64_t out_row() const { return std::int64_t{h} * d_v; }
};

// Token positions of sequence i that `rank` holds, in its local order (the ring layout
// over all ranks, or with --ulysses U > 1 the hybrid layout of ulysses_attention.hpp).
std::vector<std::int64_t> positions_for(const Problem& pr, ShardLayout layout, int ranks,
                                        int ulysses, int rank, int i) {
  if (ulysses > 1) return hybrid_shard_positions(layout, pr.len(i), ranks, ulysses, rank);
  return shard_positions(layout, pr.len(i), ranks, rank);
}

// The rows of the global [total, ...] tensor that `rank` holds, in its local order.
comm::RowSpans spans_for(const Problem& pr, ShardLayout layout, int ranks, int ulysses, int rank) {
  comm::RowSpans spans;
  for (int i = 0; i < pr.b; ++i) {
    if (ulysses > 1) {  // runs of consecutive positions become one span each
      for (auto pos : positions_for(pr, layout, ranks, ulysses, rank, i)) {
        if (!spans.empty() && spans.back().start + spans.back().count == pr.base(i) + pos &&
            spans.back().stride == 1) {
          ++spans.back().count;
        } else {
          spans.push_back({pr.base(i) + pos, 1, 1});
        }
      }
      continue;
    }
    for (const auto& c : shard_chunks(layout, pr.len(i), ranks, rank))
      spans.push_back({pr.base(i) + c.first, c.count, c.stride});
  }
  return spans;
}

// Visible (query, key) pairs of one self-attention sequence of length L.
double visible_pairs(std::int64_t len, const MaskParams& m) {
  const int wr = m.causal ? 0 : m.window_right;
  const int wl = m.window_left;
  double n = 0.0;
  for (std::int64_t i = 0; i < len; ++i) {
    std::int64_t hi = wr < 0 ? len - 1 : std::min(len - 1, i + wr);
    std::int64_t lo = wl < 0 ? 0 : std::max<std::int64_t>(0, i - wl);
    if (m.attention_chunk > 0) {  // keys of row i's chunk only
      const std::int64_t c0 = i / m.attention_chunk * m.attention_chunk;
      lo = std::max(lo, c0);
      hi = std::min(hi, c0 + m.attention_chunk - 1);
    }
    if (hi >= lo) n += static_cast<double>(hi - lo + 1);
  }
  return n;
}

// The options of `ringattn ring`, each declared once (cli/args.hpp).
struct RingArgs : MpiCommandArgs {
  // files mode
  std::string q, k, v, cu_seqlens, out, lse;
  // synthetic mode
  int batch = 1;
  std::int64_t seqlen = 0;
  std::string seqlens;
  HeadArgs heads;
  std::uint64_t seed = 0;
  // run
  std::string layout = "zigzag";
  std::string mode = "pass-kv";
  int ulysses = 1;
  int iters = 1;
  bool check = false;
  int check_rows = 4;
  bool no_progress = false;
  int piece_rows = 0;
  bool json = false;

  template <class V>
  void for_each(V& f) {
    f.group("Files mode (read/written on rank 0)");
    f(q, {"q", "queries [b, s, h, d] or varlen [total, h, d]", kNoDefault});
    f(k, {"k", "keys [b, s, h_k, d] or varlen [total, h_k, d]", kNoDefault});
    f(v, {"v", "values [b, s, h_k, d_v] or varlen [total, h_k, d_v]", kNoDefault});
    f(cu_seqlens, {"cu-seqlens", "varlen: sequence offsets [b+1] (int32/int64)", kNoDefault});
    f(out, {"out", "gathered output fp32 [b, s, h, d_v] / [total, h, d_v]", kNoDefault});
    f(lse, {"lse", "gathered LSE fp32 [b, h, s] / [h, total]", kNoDefault});
    f.group("Synthetic mode (each rank generates its own tokens)");
    f(batch, kBatchFlag);
    f(seqlen, {"seqlen", "tokens per sequence"});
    f(seqlens, {"seqlens", "varlen: comma-separated sequence lengths", kNoDefault});
    heads.for_each(f);
    f(seed, kSeedFlag);
    f.group("Run");
    f(layout, {"layout", "contiguous | zigzag | striped"});
    f(mode, {"mode", "pass-kv (K/V shards travel) | pass-q (query shards travel, K/V stay)"});
    f(ulysses, {"ulysses",
                "Ulysses degree U: P = U x R ranks, all-to-all to h/U heads, the ring over R "
                "(1 = ring only)"});
    f(iters, kItersFlag);
    f(check, {"check", "verify a sample of rows against a float64 single-process computation"});
    f(check_rows, {"check-rows", "rows per rank checked with --check"});
    f(no_progress, {"no-progress", "do not drive MPI progress between or inside kernel calls"});
    f(piece_rows, {"piece-rows", "query rows per kernel call (0 = auto)"});
    f(json, {"json", "print the result as one JSON object instead of a line"});
    mask_and_kernel(f, "Mask");
  }
  bool files() const { return given(vm, "q") || given(vm, "k") || given(vm, "v"); }
};

// What the run needs besides the shards: the parsed options and rank 0's inputs.
struct RingSetup {
  bool files = false;
  ShardLayout layout{};
  RingMode mode{};
  DType dtype{};
  MaskParams mask;  // mask.sinks points into `sinks`
  std::vector<float> sinks;
  Problem pr;
  StoredTensor q_all, k_all, v_all;  // rank 0, files mode only
  int ranks = 1, rank = 0, ulysses = 1;

  comm::SpansOf spans_of() const {
    return [this](int r) { return spans_for(pr, layout, ranks, ulysses, r); };
  }
};

// This rank's token rows of q, k, v (storage dtype) and its output rows (fp32).
struct Shards {
  std::vector<std::byte> q, k, v;
  std::vector<float> out, lse;  // [rows, h, d_v], [rows, h] (LseLayout::kRows)
};

// The timed run's figures, the same on every rank.
struct RingFigures {
  double time_s = 0.0;  // median over --iters of the slowest rank
  double alltoall_s = 0.0, alltoall_bytes = 0.0;
  double step_compute_s = 0.0, step_wait_s = 0.0, max_rank_wait_s = 0.0, step_bytes = 0.0;
  double max_rank_compute_s = 0.0, min_rank_compute_s = 0.0, kernel_calls_per_rank = 0.0;
  double flops = 0.0;
};

// Rank 0, files mode: every header checked first, then the problem and the tensors read.
void load_files(const RingArgs& a, RingSetup& st) {
  Problem& pr = st.pr;
  const bool varlen = given(a.vm, "cu-seqlens");
  const int nd = varlen ? 3 : 4, hd = nd - 2;
  const NpyFile q_file = open_tensor("--q", a.q, nd);
  const NpyFile k_file = open_tensor("--k", a.k, nd);
  const NpyFile v_file = open_tensor("--v", a.v, nd);
  const NpyHeader &q = q_file.header(), &k = k_file.header(), &v = v_file.header();
  check_dim("--k", k, 0, "--q", q, 0, varlen ? "tokens" : "batch");
  check_dim("--v", v, 0, "--q", q, 0, varlen ? "tokens" : "batch");
  if (!varlen) {
    check_dim("--k", k, 1, "--q", q, 1, "sequence");
    check_dim("--v", v, 1, "--q", q, 1, "sequence");
  }
  check_dim("--v", v, hd, "--k", k, hd, "kv heads");
  check_dim("--k", k, hd + 1, "--q", q, hd + 1, "head dim");
  pr.h = static_cast<int>(q.shape[hd]);
  pr.h_k = static_cast<int>(k.shape[hd]);
  pr.d = static_cast<int>(q.shape[hd + 1]);
  pr.d_v = static_cast<int>(v.shape[hd + 1]);
  if (varlen) {
    const NpyArray c = load_npy_arg("--cu-seqlens", a.cu_seqlens);
    RA_CHECK_ARG(c.ndim() == 1 && c.shape[0] >= 2,
                 "--cu-seqlens: expected [b+1] with b >= 1, got " << shape_to_string(c.shape));
    pr.cu = c.to_i32("--cu-seqlens");
    pr.b = static_cast<int>(pr.cu.size()) - 1;
    RA_CHECK_ARG_EQ(static_cast<std::int64_t>(pr.cu.back()), q.shape[0],
                    "--cu-seqlens: last entry must equal --q total tokens");
    pr.s = 0;
  } else {
    pr.b = static_cast<int>(q.shape[0]);
    pr.s = q.shape[1];
  }
  st.q_all = load_storage("--q", q_file, st.dtype);
  st.k_all = load_storage("--k", k_file, st.dtype);
  st.v_all = load_storage("--v", v_file, st.dtype);
}

// Synthetic mode: the problem from --batch/--seqlen or --seqlens and the head options.
Problem synthetic_problem(const RingArgs& a) {
  RA_CHECK_ARG(!given(a.vm, "out") && !given(a.vm, "lse") && !given(a.vm, "cu-seqlens"),
               "--out/--lse/--cu-seqlens: only valid with --q/--k/--v (files mode)");
  Problem pr;
  pr.b = a.batch;
  pr.s = a.seqlen;
  if (given(a.vm, "seqlens")) {
    const auto lens = parse_int_list("--seqlens", a.seqlens);
    pr.b = static_cast<int>(lens.size());
    pr.cu.assign(1, 0);
    for (int l : lens) {
      RA_CHECK_ARG_GE(l, 0, "--seqlens: length");
      pr.cu.push_back(pr.cu.back() + l);
    }
  } else {
    RA_CHECK_ARG_GT(pr.s, 0, "--seqlen (or --q/--k/--v files) is required");
    RA_CHECK_ARG_GT(pr.b, 0, "--batch");
  }
  HeadArgs heads = a.heads;
  heads.resolve();
  pr.h = heads.heads;
  pr.h_k = heads.kv_heads;
  pr.d = heads.dim;
  pr.d_v = heads.dim_v;
  return pr;
}

// Files mode: rank 0 tells the others the problem.
void broadcast_problem(const comm::Communicator& comm, Problem& pr) {
  std::int64_t hdr[7] = {
      pr.b, pr.s, pr.h, pr.h_k, pr.d, pr.d_v, static_cast<std::int64_t>(pr.cu.size())};
  RA_MPI_CHECK(MPI_Bcast(hdr, 7, MPI_INT64_T, 0, comm.get()));
  pr.b = static_cast<int>(hdr[0]);
  pr.s = hdr[1];
  pr.h = static_cast<int>(hdr[2]);
  pr.h_k = static_cast<int>(hdr[3]);
  pr.d = static_cast<int>(hdr[4]);
  pr.d_v = static_cast<int>(hdr[5]);
  pr.cu.resize(static_cast<std::size_t>(hdr[6]));
  comm::broadcast_bytes(comm, 0, pr.cu.data(), pr.cu.size() * sizeof(std::int32_t));
}

// Checks the options and reads (rank 0) or makes up the problem; every error is
// agreed by all ranks.
void set_up(const comm::Communicator& comm, const RingArgs& a, RingSetup& st) {
  st.files = a.files();
  st.ranks = comm.size();
  st.rank = comm.rank();
  st.ulysses = a.ulysses;
  comm::run_collectively(comm, [&] {
    st.layout = parse_layout(a.layout);
    st.mode = parse_ring_mode(a.mode);
    st.dtype = tensor_dtype(a.kernel);
    st.mask = to_mask_params(a.mask);
    const int iters = a.iters, check_rows = a.check_rows, piece_rows = a.piece_rows;
    RA_CHECK_ARG_GE(iters, 1, "--iters");  // the messages name the option's variable
    RA_CHECK_ARG_GE(check_rows, 1, "--check-rows");
    RA_CHECK_ARG_GE(piece_rows, 0, "--piece-rows");
    if (!st.files) {
      st.pr = synthetic_problem(a);
      return;
    }
    require(a.vm, "q");
    require(a.vm, "k");
    require(a.vm, "v");
    RA_CHECK_ARG(!given(a.vm, "seqlens") && !given(a.vm, "seqlen"),
                 "--seqlen/--seqlens: synthetic options cannot be combined with --q/--k/--v");
    if (st.rank == 0) load_files(a, st);
  });
  if (st.files) broadcast_problem(comm, st.pr);
  comm::run_collectively(comm,
                         [&] { check_ulysses_grid(st.ranks, a.ulysses, st.pr.h, st.pr.h_k); });
  // Every rank reads --sinks itself (the ring checks that all ranks pass the same).
  comm::run_collectively(comm, [&] { st.sinks = load_sinks(a.mask, st.pr.h); });
  if (!st.sinks.empty()) st.mask.sinks = st.sinks.data();
}

// This rank's shards: scattered from rank 0 (files mode) or generated for its own tokens.
Shards distribute(const comm::Communicator& comm, const RingArgs& a, const RingSetup& st) {
  const Problem& pr = st.pr;
  const auto spans_of = st.spans_of();
  const std::int64_t rows = comm::total_rows(spans_of(st.rank));
  const std::size_t es = dtype_size(st.dtype);
  const std::int64_t qr = pr.q_row(), kr = pr.k_row(), vr = pr.v_row();
  // Shard buffers are allocated collectively: an allocation failure on one rank
  // becomes the same "out of memory" error on every rank instead of a hang.
  Shards sh;
  comm::run_collectively(comm, [&] {
    sh.q.resize(static_cast<std::size_t>(rows * qr) * es);
    sh.k.resize(static_cast<std::size_t>(rows * kr) * es);
    sh.v.resize(static_cast<std::size_t>(rows * vr) * es);
    sh.out.resize(static_cast<std::size_t>(rows * pr.out_row()));
    sh.lse.resize(static_cast<std::size_t>(rows * pr.h));
  });
  if (st.files) {
    comm::scatter_rows(comm, 0, st.q_all.data(), static_cast<std::size_t>(qr) * es, spans_of,
                       sh.q.data());
    comm::scatter_rows(comm, 0, st.k_all.data(), static_cast<std::size_t>(kr) * es, spans_of,
                       sh.k.data());
    comm::scatter_rows(comm, 0, st.v_all.data(), static_cast<std::size_t>(vr) * es, spans_of,
                       sh.v.data());
    return sh;
  }
  std::int64_t row = 0;
  for (const auto& sp : spans_of(st.rank))
    for (std::int64_t i = 0; i < sp.count; ++i, ++row) {
      const std::int64_t g = sp.start + i * sp.stride;
      fill_synthetic(a.seed, 0, g * qr, qr, st.dtype,
                     sh.q.data() + static_cast<std::size_t>(row * qr) * es);
      fill_synthetic(a.seed, 1, g * kr, kr, st.dtype,
                     sh.k.data() + static_cast<std::size_t>(row * kr) * es);
      fill_synthetic(a.seed, 2, g * vr, vr, st.dtype,
                     sh.v.data() + static_cast<std::size_t>(row * vr) * es);
    }
  return sh;
}

RingAttentionParams ring_params(const RingSetup& st, Shards& sh) {
  const Problem& pr = st.pr;
  RingAttentionParams p;
  p.dtype = st.dtype;
  p.b = pr.b;
  p.s = static_cast<int>(pr.s);
  p.h = pr.h;
  p.h_k = pr.h_k;
  p.d = pr.d;
  p.d_v = pr.d_v;
  p.cu_seqlens = pr.cu.empty() ? nullptr : pr.cu.data();
  p.mask = st.mask;
  p.layout = st.layout;
  p.q = sh.q.data();
  p.k = sh.k.data();
  p.v = sh.v.data();
  p.out = sh.out.data();
  p.lse = sh.lse.data();
  p.lse_layout = LseLayout::kRows;
  return p;
}

// --iters timed runs; the figures are agreed across the ranks.
RingFigures run_timed(const comm::Communicator& comm, const Engine& engine, const RingArgs& a,
                      const RingSetup& st, const RingAttentionParams& p) {
  RingOptions options;
  options.progress = !a.no_progress;
  options.piece_rows = a.piece_rows;
  HybridStats hstats;
  std::vector<double> times;
  for (int it = 0; it < a.iters; ++it) {
    comm.barrier();
    const double t0 = now_seconds();
    hybrid_attention_forward(comm, engine, p, a.ulysses, st.mode, options, &hstats);
    times.push_back(allreduce_max(comm, now_seconds() - t0));
  }
  const int P = st.ranks, R = P / a.ulysses;  // ring steps per rank
  RingFigures f;
  f.alltoall_s = allreduce_max(comm, hstats.alltoall_s);
  f.alltoall_bytes = allreduce_sum(comm, static_cast<double>(hstats.alltoall_bytes)) / P;
  f.time_s = median_of(times);
  // Per-step figures, averaged over steps and ranks (and the max wait over ranks);
  // bytes averaged over the steps that sent something.
  double compute = 0.0, wait = 0.0, bytes = 0.0, sending = 0.0, calls = 0.0;
  for (const auto& s : hstats.ring_stats.steps) {
    calls += s.kernel_calls;
    compute += s.compute_s;
    wait += s.wait_s;
    bytes += static_cast<double>(s.bytes);
    sending += s.bytes > 0 ? 1.0 : 0.0;
  }
  f.step_compute_s = allreduce_sum(comm, compute) / (double(P) * R);
  f.step_wait_s = allreduce_sum(comm, wait) / (double(P) * R);
  f.max_rank_wait_s = allreduce_max(comm, wait);
  // The ring runs at the pace of its slowest rank: the spread of the per-rank compute
  // (last iteration, all steps) is the wait the others see.
  f.kernel_calls_per_rank = allreduce_sum(comm, calls) / P;
  f.max_rank_compute_s = allreduce_max(comm, compute);
  f.min_rank_compute_s = -allreduce_max(comm, -compute);
  const double sending_all = allreduce_sum(comm, sending);
  f.step_bytes = sending_all > 0 ? allreduce_sum(comm, bytes) / sending_all : 0.0;
  double pairs = 0.0;
  for (int i = 0; i < st.pr.b; ++i) pairs += visible_pairs(st.pr.len(i), st.mask);
  f.flops = 2.0 * (st.pr.d + st.pr.d_v) * st.pr.h * pairs;
  return f;
}

// Files mode: output and LSE rows gathered on rank 0 in the original token order,
// [total, h, d_v] and [total, h] (the ring wrote its LSE in row order).
struct Gathered {
  std::vector<float> out, lse;
};
Gathered gather(const comm::Communicator& comm, const RingSetup& st, const Shards& sh) {
  Gathered g;
  if (!st.files) return g;
  const Problem& pr = st.pr;
  if (st.rank == 0) {
    g.out.resize(static_cast<std::size_t>(pr.total() * pr.out_row()));
    g.lse.resize(static_cast<std::size_t>(pr.total() * pr.h));
  }
  const auto spans_of = st.spans_of();
  comm::gather_rows(comm, 0, sh.out.data(), static_cast<std::size_t>(pr.out_row()) * 4, spans_of,
                    g.out.data());
  comm::gather_rows(comm, 0, sh.lse.data(), static_cast<std::size_t>(pr.h) * 4, spans_of,
                    g.lse.data());
  return g;
}

// A row checked by --check: sequence, position, its output [h, d_v] and LSE [h].
struct CheckedRow {
  int seq;
  std::int64_t pos;
  const float* o;
  const float* l;
};

// --check-rows rows spread over this rank's rows (synthetic mode), or --check-rows x
// ranks rows spread over all rows on rank 0 (files mode; none elsewhere).
std::vector<CheckedRow> check_sample(const RingArgs& a, const RingSetup& st, const Shards& sh,
                                     const Gathered& g) {
  const Problem& pr = st.pr;
  const std::int64_t orow = pr.out_row();
  std::vector<CheckedRow> sample;
  if (!st.files) {
    std::vector<std::pair<int, std::int64_t>> mine;
    for (int i = 0; i < pr.b; ++i)
      for (auto pos : positions_for(pr, st.layout, st.ranks, st.ulysses, st.rank, i))
        mine.push_back({i, pos});
    const std::int64_t n = static_cast<std::int64_t>(mine.size());
    for (int c = 0; c < a.check_rows && n > 0; ++c) {
      const std::int64_t r = (c * (n - 1)) / std::max(1, a.check_rows - 1);
      sample.push_back(
          {mine[r].first, mine[r].second, sh.out.data() + r * orow, sh.lse.data() + r * pr.h});
    }
  } else if (st.rank == 0) {
    const std::int64_t n = pr.total(), want = std::int64_t{a.check_rows} * st.ranks;
    for (std::int64_t c = 0; c < want && n > 0; ++c) {
      const std::int64_t r = (c * (n - 1)) / std::max<std::int64_t>(1, want - 1);
      int seq = 0;
      while (seq + 1 < pr.b && pr.base(seq + 1) <= r) ++seq;
      sample.push_back({seq, r - pr.base(seq), g.out.data() + r * orow, g.lse.data() + r * pr.h});
    }
  }
  return sample;
}

// --check: a float64 reference for the sampled rows (from the files on rank 0 in files
// mode, from the synthetic values elsewhere); the errors agreed across the ranks.
CheckErrors check(const comm::Communicator& comm, const RingArgs& a, const RingSetup& st,
                  const Shards& sh, const Gathered& g) {
  const Problem& pr = st.pr;
  const std::int64_t qr = pr.q_row(), kr = pr.k_row(), vr = pr.v_row();
  const auto val = [&](int tensor, const StoredTensor& all, std::int64_t idx) {
    return st.files ? double(load_as_f32(all.data(), idx, st.dtype))
                    : double(synthetic_value(a.seed, tensor, idx, st.dtype));
  };
  CheckErrors err;
  std::vector<double> ro(static_cast<std::size_t>(pr.out_row())),
      rl(static_cast<std::size_t>(pr.h));
  for (const auto& row : check_sample(a, st, sh, g)) {
    const std::int64_t base = pr.base(row.seq), r = base + row.pos;
    RowRefProblem rp{pr.h, pr.h_k, pr.d, pr.d_v, pr.len(row.seq), row.pos, 0, st.mask};
    reference_row(
        rp, [&](int hh, int c) { return val(0, st.q_all, r * qr + hh * pr.d + c); },
        [&](std::int64_t j, int kh, int c) {
          return val(1, st.k_all, (base + j) * kr + kh * pr.d + c);
        },
        [&](std::int64_t j, int kh, int c) {
          return val(2, st.v_all, (base + j) * vr + kh * pr.d_v + c);
        },
        ro.data(), rl.data());
    err.add_row(row.o, row.l, 1, ro, rl);
  }
  err.max_over(comm);
  return err;
}

// Rank 0, files mode: --out [b, s, h, d_v] / [total, h, d_v] and --lse [b, h, s] / [h, total].
void write_outputs(const RingArgs& a, const Problem& pr, const Gathered& g) {
  if (!a.out.empty())
    write_f32("--out", a.out,
              pr.cu.empty() ? std::vector<std::int64_t>{pr.b, pr.s, pr.h, pr.d_v}
                            : std::vector<std::int64_t>{pr.total(), pr.h, pr.d_v},
              g.out.data());
  if (a.lse.empty()) return;
  // [total, h] -> [b, h, s] (dense) or [h, total] (varlen)
  std::vector<float> t(g.lse.size());
  const std::int64_t total = pr.total();
  lse_rows_to_api(g.lse.data(), total, pr.h, pr.b, !pr.cu.empty(), t.data());
  write_f32("--lse", a.lse,
            pr.cu.empty() ? std::vector<std::int64_t>{pr.b, pr.h, pr.s}
                          : std::vector<std::int64_t>{pr.h, total},
            t.data());
}

// Everything the result line / JSON object shows.
struct RingReport {
  const RingArgs& a;
  const RingSetup& st;
  const Engine& engine;
  const RingFigures& f;
  const CheckErrors& err;
};

void print_json(const RingReport& r) {
  const Problem& pr = r.st.pr;
  Json j = result_json("ring", r.st.ranks, r.engine);
  j["layout"] = layout_name(r.st.layout);
  j["mode"] = ring_mode_name(r.st.mode);
  j["ulysses"] = r.a.ulysses;
  j["ring_degree"] = r.st.ranks / r.a.ulysses;
  j["alltoall_s"] = json_number(r.f.alltoall_s);
  j["alltoall_bytes"] = json_number(r.f.alltoall_bytes);
  j["dtype"] = dtype_name(r.st.dtype);
  j["causal"] = r.st.mask.causal;
  j["window_left"] = r.st.mask.window_left;
  j["window_right"] = r.st.mask.window_right;
  j["attention_chunk"] = r.st.mask.attention_chunk;
  j["batch"] = pr.b;
  j["seqlen"] = pr.s;
  j["total_tokens"] = pr.total();
  write_json(j, HeadArgs{pr.h, pr.h_k, pr.d, pr.d_v});
  j["progress"] = !r.a.no_progress;
  j["iters"] = r.a.iters;
  j["time_s"] = json_number(r.f.time_s);
  j["tflops"] = json_number(r.f.flops / r.f.time_s / 1e12);
  j["step_compute_s"] = json_number(r.f.step_compute_s);
  j["step_wait_s"] = json_number(r.f.step_wait_s);
  j["max_rank_wait_s"] = json_number(r.f.max_rank_wait_s);
  j["step_bytes"] = json_number(r.f.step_bytes);
  j["max_rank_compute_s"] = json_number(r.f.max_rank_compute_s);
  j["min_rank_compute_s"] = json_number(r.f.min_rank_compute_s);
  j["kernel_calls_per_rank"] = json_number(r.f.kernel_calls_per_rank);
  if (r.a.check) r.err.to_json(j);
  std::printf("%s\n", json_dump(j).c_str());
}

void print_line(const RingReport& r) {
  const Problem& pr = r.st.pr;
  const RingFigures& f = r.f;
  std::printf(
      "ring: ranks=%d threads=%d backend=%s mode=%s layout=%s dtype=%s causal=%d b=%d "
      "total=%lld h=%d "
      "h_k=%d d=%d d_v=%d | time %.4f s (median of %d) %.3f TFLOP/s | per step: compute "
      "%.2f ms, wait %.2f ms, %.2f MB sent",
      r.st.ranks, r.engine.threads(), r.engine.backend_name().c_str(), ring_mode_name(r.st.mode),
      layout_name(r.st.layout), dtype_name(r.st.dtype), r.st.mask.causal ? 1 : 0, pr.b,
      static_cast<long long>(pr.total()), pr.h, pr.h_k, pr.d, pr.d_v, f.time_s, r.a.iters,
      f.flops / f.time_s / 1e12, f.step_compute_s * 1e3, f.step_wait_s * 1e3, f.step_bytes / 1e6);
  if (r.a.ulysses > 1)
    std::printf(" | ulysses U=%d x ring R=%d: all-to-all %.2f ms, %.2f MB sent per rank",
                r.a.ulysses, r.st.ranks / r.a.ulysses, f.alltoall_s * 1e3, f.alltoall_bytes / 1e6);
  if (r.a.check) r.err.print();
  std::printf("\n");
}

}  // namespace

int cmd_ring(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  RingArgs a;
  if (!parse_args_mpi(comm, argc, argv, options(a), kUsage, &a.vm)) return 0;
  RingSetup st;
  set_up(comm, a, st);
  Shards sh = distribute(comm, a, st);
  const RingAttentionParams p = ring_params(st, sh);
  const Engine engine = make_engine_mpi(comm, a.kernel);
  const RingFigures f = run_timed(comm, engine, a, st, p);
  const Gathered g = gather(comm, st, sh);
  const CheckErrors err = a.check ? check(comm, a, st, sh, g) : CheckErrors{};
  if (st.rank == 0) {
    if (st.files) write_outputs(a, st.pr, g);
    const RingReport report{a, st, engine, f, err};
    if (a.json) {
      print_json(report);
    } else {
      print_line(report);
    }
    std::fflush(stdout);
  }
  // --check failing is a result, not a crash: exit 1 on every rank.
  return a.check && err.failed(st.dtype, "ring", st.rank == 0) ? 1 : 0;
}

}  // namespace ringattn::cli
