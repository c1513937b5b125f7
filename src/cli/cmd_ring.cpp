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

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/ulysses_attention.hpp"
#include "ringattn/version.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: mpirun -np N ringattn ring (--q Q.npy --k K.npy --v V.npy [--out O.npy] [--lse "
    "L.npy]\n"
    "                                  | --seqlen S [--batch B] [--heads H] ...) [options]\n"
    "\n"
    "Ring attention across MPI ranks: --mode pass-kv (K/V travel, default) or pass-q (queries\n"
    "travel, K/V stay). Files are read and written on rank 0 only.";

struct Problem {
  int b = 1, h = 8, h_k = 0, d = 128, d_v = 0;
  std::int64_t s = 0;
  std::vector<std::int32_t> cu;  // varlen offsets [b+1] or empty
  std::int64_t len(int i) const { return cu.empty() ? s : cu[i + 1] - cu[i]; }
  std::int64_t base(int i) const { return cu.empty() ? i * s : cu[i]; }
  std::int64_t total() const { return cu.empty() ? b * s : cu.back(); }
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

double allreduce_max(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_MAX, comm.get()));
  return r;
}
double allreduce_sum(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_SUM, comm.get()));
  return r;
}

}  // namespace

int cmd_ring(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), rank = comm.rank();

  std::string q_path, k_path, v_path, out_path, lse_path, cu_path, seqlens_text, layout_text,
      mode_text;
  Problem pr;
  std::uint64_t seed = 0;
  int iters = 1, check_rows = 4, piece_rows = 0;
  bool check = false, json = false, no_progress = false;
  int ulysses = 1;
  MaskArgs mask_args;
  KernelArgs kernel_args;

  po::options_description io("Files mode (read/written on rank 0)");
  io.add_options()("q", po::value<std::string>(&q_path),
                   "queries [b, s, h, d] or varlen [total, h, d]")(
      "k", po::value<std::string>(&k_path), "keys [b, s, h_k, d] or varlen [total, h_k, d]")(
      "v", po::value<std::string>(&v_path), "values [b, s, h_k, d_v] or varlen [total, h_k, d_v]")(
      "cu-seqlens", po::value<std::string>(&cu_path),
      "varlen: sequence offsets [b+1] (int32/int64)")(
      "out", po::value<std::string>(&out_path),
      "gathered output fp32 [b, s, h, d_v] / [total, h, d_v]")(
      "lse", po::value<std::string>(&lse_path), "gathered LSE fp32 [b, h, s] / [h, total]");
  po::options_description syn("Synthetic mode (each rank generates its own tokens)");
  syn.add_options()("batch", po::value<int>(&pr.b)->default_value(1), "sequences")(
      "seqlen", po::value<std::int64_t>(&pr.s)->default_value(0), "tokens per sequence")(
      "seqlens", po::value<std::string>(&seqlens_text), "varlen: comma-separated sequence lengths")(
      "heads", po::value<int>(&pr.h)->default_value(8), "query heads h")(
      "kv-heads", po::value<int>(&pr.h_k)->default_value(0), "key/value heads h_k (0 = h)")(
      "dim", po::value<int>(&pr.d)->default_value(128), "head dim d")(
      "dim-v", po::value<int>(&pr.d_v)->default_value(0), "value head dim d_v (0 = d)")(
      "seed", po::value<std::uint64_t>(&seed)->default_value(0), "random seed");
  po::options_description run("Run");
  run.add_options()("layout", po::value<std::string>(&layout_text)->default_value("zigzag"),
                    "contiguous | zigzag | striped")(
      "mode", po::value<std::string>(&mode_text)->default_value("pass-kv"),
      "pass-kv (K/V shards travel) | pass-q (query shards travel, K/V stay)")(
      "ulysses", po::value<int>(&ulysses)->default_value(1),
      "Ulysses degree U: P = U x R ranks, all-to-all to h/U heads, the ring over R (1 = ring "
      "only)")("iters", po::value<int>(&iters)->default_value(1),
               "timed repetitions (median reported)")(
      "check", po::bool_switch(&check),
      "verify a sample of rows against a float64 single-process computation")(
      "check-rows", po::value<int>(&check_rows)->default_value(4),
      "rows per rank checked with --check")(
      "no-progress", po::bool_switch(&no_progress),
      "do not drive MPI progress between or inside kernel calls")(
      "piece-rows", po::value<int>(&piece_rows)->default_value(0),
      "query rows per kernel call (0 = auto)")(
      "json", po::bool_switch(&json), "print the result as one JSON object instead of a line");
  po::options_description mask("Mask");
  add_mask_options(mask, &mask_args);
  po::options_description kern("Kernel (per rank)");
  add_kernel_options(kern, &kernel_args);
  po::options_description all;
  all.add(io).add(syn).add(run).add(mask).add(kern);
  po::variables_map vm;
  if (!parse_args_mpi(comm, argc, argv, all, kUsage, &vm)) return 0;

  const bool files = vm.count("q") || vm.count("k") || vm.count("v");
  ShardLayout layout{};
  RingMode mode{};
  DType dtype{};
  MaskParams mask_params;
  StoredTensor q_all, k_all, v_all;  // rank 0, files mode only
  comm::run_collectively(comm, [&] {
    layout = parse_layout(layout_text);
    mode = parse_ring_mode(mode_text);
    dtype = tensor_dtype(kernel_args);
    mask_params = to_mask_params(mask_args);
    RA_CHECK_ARG_GE(iters, 1, "--iters");
    RA_CHECK_ARG_GE(check_rows, 1, "--check-rows");
    RA_CHECK_ARG_GE(piece_rows, 0, "--piece-rows");
    if (files) {
      require(vm, "q");
      require(vm, "k");
      require(vm, "v");
      RA_CHECK_ARG(!vm.count("seqlens") && vm["seqlen"].defaulted(),
                   "--seqlen/--seqlens: synthetic options cannot be combined with --q/--k/--v");
      if (rank != 0) return;
      const bool varlen = vm.count("cu-seqlens") > 0;
      const int nd = varlen ? 3 : 4, hd = nd - 2;
      // Headers first: every shape is checked before any data is read.
      const NpyFile q_file = open_tensor("--q", q_path, nd);
      const NpyFile k_file = open_tensor("--k", k_path, nd);
      const NpyFile v_file = open_tensor("--v", v_path, nd);
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
        const NpyArray c = load_npy_arg("--cu-seqlens", cu_path);
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
      q_all = load_storage("--q", q_file, dtype);
      k_all = load_storage("--k", k_file, dtype);
      v_all = load_storage("--v", v_file, dtype);
    } else {
      RA_CHECK_ARG(!vm.count("out") && !vm.count("lse") && !vm.count("cu-seqlens"),
                   "--out/--lse/--cu-seqlens: only valid with --q/--k/--v (files mode)");
      if (vm.count("seqlens")) {
        const auto lens = parse_int_list("--seqlens", seqlens_text);
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
      if (pr.h_k == 0) pr.h_k = pr.h;
      if (pr.d_v == 0) pr.d_v = pr.d;
    }
  });

  // Files mode: rank 0 tells the others the problem, then scatters the shards.
  if (files) {
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

  comm::run_collectively(comm, [&] { check_ulysses_grid(P, ulysses, pr.h, pr.h_k); });

  RingAttentionParams p;
  p.dtype = dtype;
  p.b = pr.b;
  p.s = static_cast<int>(pr.s);
  p.h = pr.h;
  p.h_k = pr.h_k;
  p.d = pr.d;
  p.d_v = pr.d_v;
  p.cu_seqlens = pr.cu.empty() ? nullptr : pr.cu.data();
  p.mask = mask_params;
  p.layout = layout;
  // Every rank reads --sinks itself (the ring checks that all ranks pass the same).
  std::vector<float> sinks;
  comm::run_collectively(comm, [&] { sinks = load_sinks(mask_args, pr.h); });
  if (!sinks.empty()) p.mask.sinks = sinks.data();
  const std::int64_t rows = comm::total_rows(spans_for(pr, layout, P, ulysses, rank));
  const std::size_t es = dtype_size(dtype);
  const std::int64_t qr = std::int64_t{pr.h} * pr.d, kr = std::int64_t{pr.h_k} * pr.d,
                     vr = std::int64_t{pr.h_k} * pr.d_v, orow = std::int64_t{pr.h} * pr.d_v;
  // Shard buffers are allocated collectively: an allocation failure on one rank
  // becomes the same "out of memory" error on every rank instead of a hang.
  std::vector<std::byte> q, k, v;
  std::vector<float> out, lse;
  comm::run_collectively(comm, [&] {
    q.resize(static_cast<std::size_t>(rows * qr) * es);
    k.resize(static_cast<std::size_t>(rows * kr) * es);
    v.resize(static_cast<std::size_t>(rows * vr) * es);
    out.resize(static_cast<std::size_t>(rows * orow));
    lse.resize(static_cast<std::size_t>(rows * pr.h));
  });
  const auto spans_of = [&](int r) { return spans_for(pr, layout, P, ulysses, r); };
  if (files) {
    comm::scatter_rows(comm, 0, q_all.data(), static_cast<std::size_t>(qr) * es, spans_of,
                       q.data());
    comm::scatter_rows(comm, 0, k_all.data(), static_cast<std::size_t>(kr) * es, spans_of,
                       k.data());
    comm::scatter_rows(comm, 0, v_all.data(), static_cast<std::size_t>(vr) * es, spans_of,
                       v.data());
  } else {
    std::int64_t row = 0;
    for (const auto& sp : spans_of(rank))
      for (std::int64_t i = 0; i < sp.count; ++i, ++row) {
        const std::int64_t g = sp.start + i * sp.stride;
        fill_synthetic(seed, 0, g * qr, qr, dtype,
                       q.data() + static_cast<std::size_t>(row * qr) * es);
        fill_synthetic(seed, 1, g * kr, kr, dtype,
                       k.data() + static_cast<std::size_t>(row * kr) * es);
        fill_synthetic(seed, 2, g * vr, vr, dtype,
                       v.data() + static_cast<std::size_t>(row * vr) * es);
      }
  }
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.out = out.data();
  p.lse = lse.data();
  p.lse_layout = LseLayout::kRows;

  Engine engine = [&] {
    std::unique_ptr<Engine> e;
    comm::run_collectively(comm, [&] { e = std::make_unique<Engine>(make_engine(kernel_args)); });
    return std::move(*e);
  }();
  RingOptions options;
  options.progress = !no_progress;
  options.piece_rows = piece_rows;
  HybridStats hstats;
  const RingStats& stats = hstats.ring_stats;
  std::vector<double> times;
  for (int it = 0; it < iters; ++it) {
    comm.barrier();
    const double t0 = now_seconds();
    hybrid_attention_forward(comm, engine, p, ulysses, mode, options, &hstats);
    times.push_back(allreduce_max(comm, now_seconds() - t0));
  }
  const int R = P / ulysses;  // ring steps per rank
  const double a2a_s = allreduce_max(comm, hstats.alltoall_s);
  const double a2a_bytes = allreduce_sum(comm, static_cast<double>(hstats.alltoall_bytes)) / P;
  const double t_med = median(times);

  // Per-step figures, averaged over steps and ranks (and the max wait over ranks);
  // bytes averaged over the steps that sent something.
  double compute = 0.0, wait = 0.0, bytes = 0.0, sending = 0.0, calls = 0.0;
  for (const auto& s : stats.steps) {
    calls += s.kernel_calls;
    compute += s.compute_s;
    wait += s.wait_s;
    bytes += static_cast<double>(s.bytes);
    sending += s.bytes > 0 ? 1.0 : 0.0;
  }
  const double compute_step = allreduce_sum(comm, compute) / (double(P) * R);
  const double wait_step = allreduce_sum(comm, wait) / (double(P) * R);
  const double wait_max = allreduce_max(comm, wait);
  // The ring runs at the pace of its slowest rank: the spread of the per-rank compute
  // (last iteration, all steps) is the wait the others see.
  const double calls_per_rank = allreduce_sum(comm, calls) / P;
  const double compute_max = allreduce_max(comm, compute);
  const double compute_min = -allreduce_max(comm, -compute);
  const double sending_all = allreduce_sum(comm, sending);
  const double bytes_step = sending_all > 0 ? allreduce_sum(comm, bytes) / sending_all : 0.0;
  double pairs = 0.0;
  for (int i = 0; i < pr.b; ++i) pairs += visible_pairs(pr.len(i), mask_params);
  const double flops = 2.0 * (pr.d + pr.d_v) * pr.h * pairs;

  // Gather output and LSE (files mode) in the original token order.
  // The ring wrote its LSE in row order (p.lse_layout = kRows): gathered as it is.
  const std::vector<float>& lse_rows = lse;  // [rows, h]
  std::vector<float> out_all, lse_all;
  if (files) {
    if (rank == 0) {
      out_all.resize(static_cast<std::size_t>(pr.total() * orow));
      lse_all.resize(static_cast<std::size_t>(pr.total() * pr.h));
    }
    comm::gather_rows(comm, 0, out.data(), static_cast<std::size_t>(orow) * 4, spans_of,
                      out_all.data());
    comm::gather_rows(comm, 0, lse_rows.data(), static_cast<std::size_t>(pr.h) * 4, spans_of,
                      lse_all.data());
  }

  // --check: float64 reference for a sample of rows (per rank in synthetic mode,
  // on rank 0 from the files in files mode).
  double max_err = 0.0, max_lse_err = 0.0;
  if (check) {
    struct Row {
      int seq;
      std::int64_t pos;
      const float* o;
      const float* l;  // [h], stride lse_stride
    };
    std::vector<Row> sample;
    if (!files) {
      std::vector<std::pair<int, std::int64_t>> mine;
      for (int i = 0; i < pr.b; ++i)
        for (auto pos : positions_for(pr, layout, P, ulysses, rank, i)) mine.push_back({i, pos});
      const std::int64_t n = static_cast<std::int64_t>(mine.size());
      for (int c = 0; c < check_rows && n > 0; ++c) {
        const std::int64_t r = (c * (n - 1)) / std::max(1, check_rows - 1);
        sample.push_back(
            {mine[r].first, mine[r].second, out.data() + r * orow, lse_rows.data() + r * pr.h});
      }
    } else if (rank == 0) {
      const std::int64_t n = pr.total(), want = std::int64_t{check_rows} * P;
      for (std::int64_t c = 0; c < want && n > 0; ++c) {
        const std::int64_t g = (c * (n - 1)) / std::max<std::int64_t>(1, want - 1);
        int seq = 0;
        while (seq + 1 < pr.b && pr.base(seq + 1) <= g) ++seq;
        sample.push_back(
            {seq, g - pr.base(seq), out_all.data() + g * orow, lse_all.data() + g * pr.h});
      }
    }
    std::vector<double> ro(static_cast<std::size_t>(orow)), rl(static_cast<std::size_t>(pr.h));
    for (const auto& row : sample) {
      const std::int64_t base = pr.base(row.seq), g = base + row.pos;
      const auto val = [&](int tensor, const StoredTensor& all, std::int64_t idx) {
        return files ? double(load_as_f32(all.data(), idx, dtype))
                     : double(synthetic_value(seed, tensor, idx, dtype));
      };
      RowRefProblem rp{pr.h, pr.h_k, pr.d, pr.d_v, pr.len(row.seq), row.pos, 0, p.mask};
      reference_row(
          rp, [&](int hh, int c) { return val(0, q_all, g * qr + hh * pr.d + c); },
          [&](std::int64_t j, int kh, int c) {
            return val(1, k_all, (base + j) * kr + kh * pr.d + c);
          },
          [&](std::int64_t j, int kh, int c) {
            return val(2, v_all, (base + j) * vr + kh * pr.d_v + c);
          },
          ro.data(), rl.data());
      for (std::int64_t e = 0; e < orow; ++e)
        max_err = std::max(max_err, std::abs(double(row.o[e]) - ro[static_cast<std::size_t>(e)]));
      for (int hh = 0; hh < pr.h; ++hh) {
        const double a = row.l[hh], b = rl[static_cast<std::size_t>(hh)];
        const double err = (std::isinf(a) && std::isinf(b) && a == b)
                               ? 0.0
                               : std::abs(a - b) / std::max(1.0, std::abs(b));
        max_lse_err = std::max(max_lse_err, std::isnan(err) ? 1e30 : err);
      }
    }
    max_err = allreduce_max(comm, max_err);
    max_lse_err = allreduce_max(comm, max_lse_err);
  }

  if (rank == 0) {
    if (files && !out_path.empty())
      write_f32("--out", out_path,
                pr.cu.empty() ? std::vector<std::int64_t>{pr.b, pr.s, pr.h, pr.d_v}
                              : std::vector<std::int64_t>{pr.total(), pr.h, pr.d_v},
                out_all.data());
    if (files && !lse_path.empty()) {
      // [total, h] -> [b, h, s] (dense) or [h, total] (varlen)
      std::vector<float> t(lse_all.size());
      const std::int64_t total = pr.total();
      lse_rows_to_api(lse_all.data(), total, pr.h, pr.b, !pr.cu.empty(), t.data());
      write_f32("--lse", lse_path,
                pr.cu.empty() ? std::vector<std::int64_t>{pr.b, pr.h, pr.s}
                              : std::vector<std::int64_t>{pr.h, total},
                t.data());
    }
    const double tflops = flops / t_med / 1e12;
    if (json) {
      Json j;
      j["command"] = "ring";
      j["version"] = version();
      j["ranks"] = P;
      j["threads"] = engine.threads();
      j["backend"] = engine.backend_name();
      j["layout"] = layout_name(layout);
      j["mode"] = ring_mode_name(mode);
      j["ulysses"] = ulysses;
      j["ring_degree"] = R;
      j["alltoall_s"] = json_number(a2a_s);
      j["alltoall_bytes"] = json_number(a2a_bytes);
      j["dtype"] = dtype_name(dtype);
      j["causal"] = mask_params.causal;
      j["window_left"] = mask_params.window_left;
      j["window_right"] = mask_params.window_right;
      j["attention_chunk"] = mask_params.attention_chunk;
      j["batch"] = pr.b;
      j["seqlen"] = pr.s;
      j["total_tokens"] = pr.total();
      j["heads"] = pr.h;
      j["kv_heads"] = pr.h_k;
      j["dim"] = pr.d;
      j["dim_v"] = pr.d_v;
      j["progress"] = !no_progress;
      j["iters"] = iters;
      j["time_s"] = json_number(t_med);
      j["tflops"] = json_number(tflops);
      j["step_compute_s"] = json_number(compute_step);
      j["step_wait_s"] = json_number(wait_step);
      j["max_rank_wait_s"] = json_number(wait_max);
      j["step_bytes"] = json_number(bytes_step);
      j["max_rank_compute_s"] = json_number(compute_max);
      j["min_rank_compute_s"] = json_number(compute_min);
      j["kernel_calls_per_rank"] = json_number(calls_per_rank);
      if (check) {
        j["max_abs_err"] = json_number(max_err);
        j["max_lse_rel_err"] = json_number(max_lse_err);
      }
      std::printf("%s\n", json_dump(j).c_str());
    } else {
      std::printf(
          "ring: ranks=%d threads=%d backend=%s mode=%s layout=%s dtype=%s causal=%d b=%d "
          "total=%lld h=%d "
          "h_k=%d d=%d d_v=%d | time %.4f s (median of %d) %.3f TFLOP/s | per step: compute "
          "%.2f ms, wait %.2f ms, %.2f MB sent",
          P, engine.threads(), engine.backend_name().c_str(), ring_mode_name(mode),
          layout_name(layout), dtype_name(dtype), mask_params.causal ? 1 : 0, pr.b,
          static_cast<long long>(pr.total()), pr.h, pr.h_k, pr.d, pr.d_v, t_med, iters, tflops,
          compute_step * 1e3, wait_step * 1e3, bytes_step / 1e6);
      if (ulysses > 1)
        std::printf(" | ulysses U=%d x ring R=%d: all-to-all %.2f ms, %.2f MB sent per rank",
                    ulysses, R, a2a_s * 1e3, a2a_bytes / 1e6);
      if (check)
        std::printf(" | check: max abs err %.3g, max LSE rel err %.3g", max_err, max_lse_err);
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  // --check failing is a result, not a crash: exit 1 on every rank.
  const double tol = dtype == DType::kF32 ? 1e-4 : 3e-2;
  if (check && (max_err > tol || max_lse_err > tol)) {
    if (rank == 0)
      std::fprintf(stderr, "ringattn ring: error: --check failed: max abs err %g (tolerance %g)\n",
                   max_err, tol);
    return 1;
  }
  return 0;
}

}  // namespace ringattn::cli
