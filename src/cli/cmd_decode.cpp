// `ringattn decode` (under mpirun): distributed decode over a KV cache sharded
// contiguously across the ranks of MPI_COMM_WORLD; partial (out, lse) per rank are
// combined by a reduce whose MPI operation is the LSE merge.
//   files:     --q [b, s_q, h, d] --k-cache [b, S, h_k, d] --v-cache [b, S, h_k, d_v]
//              read on rank 0 (q broadcast, caches scattered); --out [b, s_q, h, d_v] and
//              --lse [b, h, s_q] (fp32, natural log) written by rank 0.
//   synthetic: --batch --seqlen (cache length S) --q-len --heads --kv-heads --dim --seed.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/error.hpp"
#include "ringattn/version.hpp"

namespace ringattn::cli {

namespace {
constexpr const char* kUsage =
    "usage: mpirun -np N ringattn decode (--q Q.npy --k-cache K.npy --v-cache V.npy [--out O.npy]\n"
    "                                    [--lse L.npy] | --seqlen S [--batch B] ...) [options]\n"
    "\n"
    "Distributed decode: the KV cache is split across ranks, partial results are merged\n"
    "by an MPI reduction whose operation is the LSE merge.";
}  // namespace

int cmd_decode(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), rank = comm.rank();

  std::string q_path, kc_path, vc_path, out_path, lse_path;
  DecodeParams p;
  int b = 1, s_q = 1, h = 8, h_k = 0, d = 128, d_v = 0, iters = 1;
  std::int64_t s = 0;
  std::uint64_t seed = 0;
  bool check = false, json = false;
  MaskArgs mask_args;
  KernelArgs kernel_args;
  po::options_description io("Files mode (read/written on rank 0)");
  io.add_options()("q", po::value<std::string>(&q_path), "queries [b, s_q, h, d]")(
      "k-cache", po::value<std::string>(&kc_path), "key cache [b, S, h_k, d]")(
      "v-cache", po::value<std::string>(&vc_path), "value cache [b, S, h_k, d_v]")(
      "out", po::value<std::string>(&out_path), "output fp32 [b, s_q, h, d_v]")(
      "lse", po::value<std::string>(&lse_path), "LSE fp32 [b, h, s_q]");
  po::options_description syn("Synthetic mode");
  syn.add_options()("batch", po::value<int>(&b)->default_value(1), "sequences")(
      "seqlen", po::value<std::int64_t>(&s)->default_value(0), "cache length S per sequence")(
      "q-len", po::value<int>(&s_q)->default_value(1), "new query rows s_q per sequence")(
      "heads", po::value<int>(&h)->default_value(8), "query heads h")(
      "kv-heads", po::value<int>(&h_k)->default_value(0), "key/value heads h_k (0 = h)")(
      "dim", po::value<int>(&d)->default_value(128), "head dim d")(
      "dim-v", po::value<int>(&d_v)->default_value(0), "value head dim (0 = d)")(
      "seed", po::value<std::uint64_t>(&seed)->default_value(0), "random seed");
  po::options_description run("Run");
  run.add_options()("iters", po::value<int>(&iters)->default_value(1),
                    "timed repetitions (median reported)")(
      "check", po::bool_switch(&check), "verify every row against a float64 computation")(
      "json", po::bool_switch(&json), "print the result as one JSON object");
  po::options_description mask("Mask");
  add_mask_options(mask, &mask_args);
  po::options_description kern("Kernel (per rank)");
  add_kernel_options(kern, &kernel_args);
  po::options_description all;
  all.add(io).add(syn).add(run).add(mask).add(kern);
  po::variables_map vm;
  if (!parse_args_mpi(comm, argc, argv, all, kUsage, &vm)) return 0;

  const bool files = vm.count("q") || vm.count("k-cache") || vm.count("v-cache");
  StoredTensor q_all, k_all, v_all;
  std::optional<OutputTensor> out_file, lse_file;  // rank 0, files mode
  std::unique_ptr<Engine> engine;
  comm::run_collectively(comm, [&] {
    p.dtype = tensor_dtype(kernel_args);
    p.mask = to_mask_params(mask_args);
    engine = std::make_unique<Engine>(make_engine(kernel_args));
    RA_CHECK_ARG_GE(iters, 1, "--iters");
    if (!files) {
      RA_CHECK_ARG_GT(s, 0, "--seqlen (or --q/--k-cache/--v-cache files) is required");
      if (h_k == 0) h_k = h;
      if (d_v == 0) d_v = d;
      return;
    }
    require(vm, "q");
    require(vm, "k-cache");
    require(vm, "v-cache");
    if (rank != 0) return;
    // Headers first: every shape is checked before any data is read.
    const NpyFile q_file = open_tensor("--q", q_path, 4);
    const NpyFile k_file = open_tensor("--k-cache", kc_path, 4);
    const NpyFile v_file = open_tensor("--v-cache", vc_path, 4);
    const NpyHeader &q = q_file.header(), &k = k_file.header(), &v = v_file.header();
    check_dim("--k-cache", k, 0, "--q", q, 0, "batch");
    check_dim("--v-cache", v, 0, "--q", q, 0, "batch");
    check_dim("--v-cache", v, 1, "--k-cache", k, 1, "cache length");
    check_dim("--v-cache", v, 2, "--k-cache", k, 2, "kv heads");
    check_dim("--k-cache", k, 3, "--q", q, 3, "head dim");
    b = static_cast<int>(q.shape[0]);
    s_q = static_cast<int>(q.shape[1]);
    h = static_cast<int>(q.shape[2]);
    d = static_cast<int>(q.shape[3]);
    s = k.shape[1];
    h_k = static_cast<int>(k.shape[2]);
    d_v = static_cast<int>(v.shape[3]);
    // Output files are created before anything is computed (a bad path fails at once).
    if (!out_path.empty())
      out_file.emplace("--out", out_path, std::vector<std::int64_t>{b, s_q, h, d_v});
    if (!lse_path.empty())
      lse_file.emplace("--lse", lse_path, std::vector<std::int64_t>{b, h, s_q});
    q_all = load_storage("--q", q_file, p.dtype);
    k_all = load_storage("--k-cache", k_file, p.dtype);
    v_all = load_storage("--v-cache", v_file, p.dtype);
  });
  if (files) {
    std::int64_t hdr[7] = {b, s_q, h, h_k, d, d_v, s};
    RA_MPI_CHECK(MPI_Bcast(hdr, 7, MPI_INT64_T, 0, comm.get()));
    b = static_cast<int>(hdr[0]);
    s_q = static_cast<int>(hdr[1]);
    h = static_cast<int>(hdr[2]);
    h_k = static_cast<int>(hdr[3]);
    d = static_cast<int>(hdr[4]);
    d_v = static_cast<int>(hdr[5]);
    s = hdr[6];
  }
  p.b = b;
  p.s_q = s_q;
  p.h = h;
  p.h_k = h_k;
  p.d = d;
  p.d_v = d_v;
  p.s_cache = s;
  p.root = 0;
  // Every rank reads --sinks itself (the decode checks that all ranks pass the same).
  std::vector<float> sinks;
  comm::run_collectively(comm, [&] { sinks = load_sinks(mask_args, h); });
  if (!sinks.empty()) p.mask.sinks = sinks.data();
  const std::size_t es = dtype_size(p.dtype);
  const std::int64_t n = s >= P ? decode_shard_length(s, P, rank) : 0;
  const std::int64_t k0 = s >= P ? decode_shard_first(s, P, rank) : 0;
  const std::int64_t qn = std::int64_t{b} * s_q * h * d, kr = std::int64_t{h_k} * d,
                     vr = std::int64_t{h_k} * d_v;
  // Every element is filled below (broadcast, scatter or synthetic): no zero fill.
  const std::size_t q_bytes = static_cast<std::size_t>(qn) * es;
  const std::unique_ptr<std::byte[]> q(new std::byte[std::max<std::size_t>(q_bytes, 1)]),
      kc(new std::byte[std::max<std::size_t>(static_cast<std::size_t>(b * n * kr) * es, 1)]),
      vc(new std::byte[std::max<std::size_t>(static_cast<std::size_t>(b * n * vr) * es, 1)]);
  const auto spans_of = [&](int r) {
    comm::RowSpans sp;
    if (s < P) return sp;
    for (int i = 0; i < b; ++i)
      sp.push_back({i * s + decode_shard_first(s, P, r), decode_shard_length(s, P, r), 1});
    return sp;
  };
  if (files) {
    if (rank == 0 && q_bytes > 0) std::memcpy(q.get(), q_all.data(), q_bytes);
    comm::broadcast_bytes(comm, 0, q.get(), q_bytes);
    comm::scatter_rows(comm, 0, k_all.data(), static_cast<std::size_t>(kr) * es, spans_of,
                       kc.get());
    comm::scatter_rows(comm, 0, v_all.data(), static_cast<std::size_t>(vr) * es, spans_of,
                       vc.get());
  } else {
    fill_synthetic(seed, 0, 0, qn, p.dtype, q.get());
    for (int i = 0; i < b; ++i) {
      fill_synthetic(seed, 1, (i * s + k0) * kr, n * kr, p.dtype,
                     kc.get() + static_cast<std::size_t>(i * n * kr) * es);
      fill_synthetic(seed, 2, (i * s + k0) * vr, n * vr, p.dtype,
                     vc.get() + static_cast<std::size_t>(i * n * vr) * es);
    }
  }
  // Rank 0 (files mode) writes into the output files; elsewhere uninitialised buffers.
  if (!out_file) out_file.emplace("--out", "", std::vector<std::int64_t>{b, s_q, h, d_v});
  if (!lse_file) lse_file.emplace("--lse", "", std::vector<std::int64_t>{b, h, s_q});
  const float* out = out_file->data();
  const float* lse = lse_file->data();
  p.q = q.get();
  p.k_cache = kc.get();
  p.v_cache = vc.get();
  p.out = out_file->data();
  p.lse = lse_file->data();
  std::vector<double> times;
  for (int it = 0; it < iters; ++it) {
    comm.barrier();
    const double t0 = now_seconds();
    distributed_decode(comm, *engine, p);
    double t = now_seconds() - t0, tmax = 0.0;
    RA_MPI_CHECK(MPI_Allreduce(&t, &tmax, 1, MPI_DOUBLE, MPI_MAX, comm.get()));
    times.push_back(tmax);
  }
  if (rank != 0) return 0;

  double max_err = 0.0, max_lse_err = 0.0;
  if (check) {
    std::vector<double> ro(static_cast<std::size_t>(h * d_v)), rl(static_cast<std::size_t>(h));
    const auto val = [&](int tensor, const StoredTensor& a, std::int64_t idx) {
      return files ? double(load_as_f32(a.data(), idx, p.dtype))
                   : double(synthetic_value(seed, tensor, idx, p.dtype));
    };
    for (int bi = 0; bi < b; ++bi)
      for (int i = 0; i < s_q; ++i) {
        RowRefProblem rp{h, h_k, d, d_v, s, i, s - s_q, p.mask};
        const std::int64_t qb = (std::int64_t{bi} * s_q + i) * h * d;
        reference_row(
            rp, [&](int hh, int c) { return val(0, q_all, qb + hh * d + c); },
            [&](std::int64_t j, int kh, int c) {
              return val(1, k_all, (bi * s + j) * kr + kh * d + c);
            },
            [&](std::int64_t j, int kh, int c) {
              return val(2, v_all, (bi * s + j) * vr + kh * d_v + c);
            },
            ro.data(), rl.data());
        for (int hh = 0; hh < h; ++hh) {
          const std::int64_t r = (std::int64_t{bi} * s_q + i) * h + hh;
          for (int c = 0; c < d_v; ++c)
            max_err = std::max(max_err, std::abs(out[r * d_v + c] - ro[hh * d_v + c]));
          const double a = lse[(std::int64_t{bi} * h + hh) * s_q + i], e = rl[hh];
          const double err =
              (std::isinf(a) && a == e) ? 0.0 : std::abs(a - e) / std::max(1.0, std::abs(e));
          max_lse_err = std::max(max_lse_err, std::isnan(err) ? 1e30 : err);
        }
      }
  }
  out_file->commit();
  lse_file->commit();
  const double t_med = median(times);
  // Cache bytes the query rows reach (positions s - s_q .. s - 1): all of it, or from the
  // left window's / attention chunk's first key on (the decode reads no other key).
  std::int64_t first_key = 0;
  if (p.mask.window_left >= 0) first_key = std::max<std::int64_t>(0, s - s_q - p.mask.window_left);
  if (p.mask.attention_chunk > 0)
    first_key =
        std::max<std::int64_t>(first_key, std::max<std::int64_t>(0, s - s_q) /
                                              p.mask.attention_chunk * p.mask.attention_chunk);
  const double bytes = static_cast<double>(b) * static_cast<double>(s - first_key) * (kr + vr) *
                       static_cast<double>(es);
  if (json) {
    Json j;
    j["command"] = "decode";
    j["version"] = version();
    j["ranks"] = P;
    j["threads"] = engine->threads();
    j["backend"] = engine->backend_name();
    j["dtype"] = dtype_name(p.dtype);
    j["batch"] = b;
    j["q_len"] = s_q;
    j["cache_len"] = s;
    j["heads"] = h;
    j["kv_heads"] = h_k;
    j["dim"] = d;
    j["dim_v"] = d_v;
    j["iters"] = iters;
    j["time_s"] = json_number(t_med);
    j["cache_gbps"] = json_number(bytes / t_med / 1e9);
    if (check) {
      j["max_abs_err"] = json_number(max_err);
      j["max_lse_rel_err"] = json_number(max_lse_err);
    }
    std::printf("%s\n", json_dump(j).c_str());
  } else {
    std::printf(
        "decode: ranks=%d threads=%d backend=%s dtype=%s b=%d q_len=%d cache=%lld h=%d h_k=%d "
        "d=%d d_v=%d | time %.4f s (median of %d) %.2f GB/s of cache",
        P, engine->threads(), engine->backend_name().c_str(), dtype_name(p.dtype), b, s_q,
        static_cast<long long>(s), h, h_k, d, d_v, t_med, iters, bytes / t_med / 1e9);
    if (check)
      std::printf(" | check: max abs err %.3g, max LSE rel err %.3g", max_err, max_lse_err);
    std::printf("\n");
  }
  const double tol = p.dtype == DType::kF32 ? 1e-4 : 3e-2;
  if (check && (max_err > tol || max_lse_err > tol)) {
    std::fprintf(stderr, "ringattn decode: error: --check failed: max abs err %g (tolerance %g)\n",
                 max_err, tol);
    return 1;
  }
  return 0;
}

}  // namespace ringattn::cli
