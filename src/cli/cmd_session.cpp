// `ringattn session` (under mpirun): an inference session over a KV cache sharded across
// the ranks (kv_session.hpp): prefill of a prompt, T decode steps of t tokens, an optional
// follow-up prefill ("extend") against the whole cached context.
//   files mode      rank 0 reads --prompt-q/k/v ([b, S0, h, *] or varlen [total, h, *] with
//                   --prompt-cu-seqlens), --decode-q/k/v ([T, b, t, h, *]) and
//                   --extend-q/k/v ([b, S1, h, *]); --out-dir DIR gets the outputs (fp32).
//   synthetic mode  --batch --prompt-len --decode-steps --decode-tokens --extend-len with
//                   deterministic values each rank generates for its own tokens; --check
//                   compares sampled rows with a float64 computation.
// Prints one result line on rank 0 (or a JSON object with --json): time to first token,
// decode step latency (median, p99), the merge's share of a step, extend time and mode.
#include <mpi.h>

#include <algorithm>
#include <boost/program_options.hpp>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "cli/session_mla.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/kv_session.hpp"
#include "ringattn/version.hpp"

namespace ringattn::cli {

namespace {

const char* kUsage =
    "usage: mpirun -np P ringattn session [options]\n"
    "An inference session over a KV cache sharded across the ranks: prefill, decode steps,\n"
    "extend. Files mode (--prompt-q/k/v, --decode-q/k/v, --extend-q/k/v, --out-dir) or\n"
    "synthetic mode (--batch --prompt-len --decode-steps --extend-len, --check).\n";

double max_all(const comm::Communicator& comm, double x) {
  double r = 0.0;
  RA_MPI_CHECK(MPI_Allreduce(&x, &r, 1, MPI_DOUBLE, MPI_MAX, comm.get()));
  return r;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())) - 1);
  return v[std::min(i, v.size() - 1)];
}

// The session's tokens: per sequence its prompt, then T steps of t tokens, then S1.
struct Shape {
  int b = 1, h = 8, h_k = 0, d = 128, d_v = 0;
  int steps = 0, t = 1, s1 = 0;
  std::vector<std::int64_t> prompt;  // [b]
  bool varlen = false;
  std::int64_t prompt_max() const {
    return prompt.empty() ? 0 : *std::max_element(prompt.begin(), prompt.end());
  }
  std::int64_t capacity() const { return prompt_max() + std::int64_t{steps} * t + s1; }
};

}  // namespace

int cmd_session(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), rank = comm.rank();

  std::string pq_path, pk_path, pv_path, pcu_path, dq_path, dk_path, dv_path, eq_path, ek_path,
      ev_path, out_dir, cache_layout_text, prefill_layout_text, extend_mode_text;
  Shape sh;
  std::int64_t prompt_len = 0;
  std::uint64_t seed = 0;
  int page_size = 256, check_rows = 2;
  bool check = false, json = false, reduce_to_root = false, skip_prefill = false,
       merge_barrier = false, mla = false;
  MaskArgs mask_args;
  KernelArgs kernel_args;

  po::options_description io("Files mode (read/written on rank 0)");
  io.add_options()("prompt-q", po::value<std::string>(&pq_path),
                   "prompt queries [b, S0, h, d] or varlen [total, h, d]")(
      "prompt-k", po::value<std::string>(&pk_path),
      "prompt keys [b, S0, h_k, d] / [total, h_k, d]")(
      "prompt-v", po::value<std::string>(&pv_path),
      "prompt values [b, S0, h_k, d_v] / [total, h_k, d_v]")(
      "prompt-cu-seqlens", po::value<std::string>(&pcu_path),
      "varlen prompts: offsets [b+1] (int32/int64)")("decode-q", po::value<std::string>(&dq_path),
                                                     "decode queries [T, b, t, h, d]")(
      "decode-k", po::value<std::string>(&dk_path), "decode keys [T, b, t, h_k, d]")(
      "decode-v", po::value<std::string>(&dv_path), "decode values [T, b, t, h_k, d_v]")(
      "extend-q", po::value<std::string>(&eq_path), "extend queries [b, S1, h, d]")(
      "extend-k", po::value<std::string>(&ek_path), "extend keys [b, S1, h_k, d]")(
      "extend-v", po::value<std::string>(&ev_path), "extend values [b, S1, h_k, d_v]")(
      "out-dir", po::value<std::string>(&out_dir),
      "write prefill_/decode_/extend_ out.npy and lse.npy (fp32) here");
  po::options_description syn("Synthetic mode (each rank generates its own tokens)");
  syn.add_options()("batch", po::value<int>(&sh.b)->default_value(1), "sequences")(
      "prompt-len", po::value<std::int64_t>(&prompt_len)->default_value(0), "prompt tokens S0")(
      "decode-steps", po::value<int>(&sh.steps)->default_value(0), "decode steps T")(
      "decode-tokens", po::value<int>(&sh.t)->default_value(1), "tokens per decode step t")(
      "extend-len", po::value<int>(&sh.s1)->default_value(0), "extend tokens S1 (0 = none)")(
      "heads", po::value<int>(&sh.h)->default_value(8), "query heads h")(
      "kv-heads", po::value<int>(&sh.h_k)->default_value(0), "key/value heads h_k (0 = h)")(
      "dim", po::value<int>(&sh.d)->default_value(128), "head dim d")(
      "dim-v", po::value<int>(&sh.d_v)->default_value(0), "value head dim d_v (0 = d)")(
      "seed", po::value<std::uint64_t>(&seed)->default_value(0), "random seed")(
      "check", po::bool_switch(&check), "verify sampled rows against float64")(
      "check-rows", po::value<int>(&check_rows)->default_value(2),
      "prefill rows per rank checked with --check");
  po::options_description run("Session");
  run.add_options()("page-size", po::value<int>(&page_size)->default_value(256),
                    "tokens per cache page (and per round-robin block)")(
      "cache-layout", po::value<std::string>(&cache_layout_text)->default_value("round-robin"),
      "owner of appended tokens: round-robin (blocks of page-size tokens) | contiguous")(
      "prefill-layout", po::value<std::string>(&prefill_layout_text)->default_value("zigzag"),
      "prompt shards of the prefill ring: zigzag | contiguous | striped")(
      "extend-mode", po::value<std::string>(&extend_mode_text)->default_value("auto"),
      "auto (cost model) | pass-q | pass-kv")(
      "reduce-to-root", po::bool_switch(&reduce_to_root),
      "decode: reduce the partials to rank 0 instead of an allreduce")(
      "mla", po::bool_switch(&mla),
      "DeepSeek MLA (synthetic mode): a latent cache [*, 576] sharded across the ranks, "
      "prompt latents stored without attention, decode steps over it; --heads = query heads, "
      "--dtype = queries and cache (fp32 | bf16)")(
      "merge-after-barrier", po::bool_switch(&merge_barrier),
      "decode measurement mode: a barrier before each step's merge reduction, which then "
      "times the merge alone")(
      "skip-prefill-attention", po::bool_switch(&skip_prefill),
      "store the prompt's K/V without computing its attention (decode/extend benchmarks over "
      "long contexts; no prefill outputs)")("json", po::bool_switch(&json),
                                            "print the result as one JSON object");
  po::options_description mask("Mask (the session is causal)");
  add_mask_options(mask, &mask_args);
  po::options_description kern("Kernel (per rank)");
  add_kernel_options(kern, &kernel_args);
  po::options_description all;
  all.add(io).add(syn).add(run).add(mask).add(kern);
  po::variables_map vm;
  if (!parse_args_mpi(comm, argc, argv, all, kUsage, &vm)) return 0;

  const bool files = vm.count("prompt-q") || vm.count("prompt-k") || vm.count("prompt-v");
  DType dtype{};
  MaskParams mask_params;
  CacheLayout cache_layout{};
  ShardLayout prefill_layout{};
  ExtendMode extend_mode{};
  // Rank 0, files mode: whole prompt tensors (storage dtype) and their row offsets.
  std::vector<std::byte> pq, pk, pv;
  std::vector<std::int64_t> pbase;
  // Every rank: decode [T, b, t, ...] and extend [b, S1, ...] tensors (storage dtype).
  std::vector<std::byte> dq, dk, dv, eq, ek, ev;
  comm::run_collectively(comm, [&] {
    dtype = tensor_dtype(kernel_args);
    mask_params = to_mask_params(mask_args);
    RA_CHECK_ARG(mask_params.window_right <= 0, "--window: right "
                                                    << mask_params.window_right
                                                    << " must be 0 or -1 (the session is causal)");
    mask_params.causal = true;
    mask_params.window_right = 0;
    cache_layout = parse_cache_layout(cache_layout_text);
    prefill_layout = parse_layout(prefill_layout_text);
    extend_mode = parse_extend_mode(extend_mode_text);
    RA_CHECK_ARG_GE(page_size, 1, "--page-size");
    RA_CHECK_ARG_GE(check_rows, 1, "--check-rows");
    RA_CHECK_ARG(!(skip_prefill && vm.count("out-dir")),
                 "--skip-prefill-attention: no prefill outputs to write with --out-dir");
    if (!files) {
      RA_CHECK_ARG(!vm.count("out-dir") && !vm.count("decode-q") && !vm.count("extend-q"),
                   "--out-dir/--decode-*/--extend-*: only valid with --prompt-q/k/v (files mode)");
      RA_CHECK_ARG_GT(sh.b, 0, "--batch");
      RA_CHECK_ARG_GE(prompt_len, 1, "--prompt-len (or --prompt-q/k/v files) is required");
      RA_CHECK_ARG_GE(sh.steps, 0, "--decode-steps");
      RA_CHECK_ARG_GE(sh.t, 1, "--decode-tokens");
      RA_CHECK_ARG_GE(sh.s1, 0, "--extend-len");
      RA_CHECK_ARG(
          !mla || (sh.s1 == 0 && mask_params.window_left < 0 && mask_params.softcap == 0.0f &&
                   vm["kv-heads"].defaulted() && vm["dim"].defaulted() && vm["dim-v"].defaulted()),
          "--mla: decode only, no --extend-len, --window, --softcap, --kv-heads or "
          "--dim (the latent is 576 wide, one KV head)");
      RA_CHECK(!mla || dtype == DType::kF32 || dtype == DType::kBF16, UnsupportedError,
               "--mla: --dtype " << dtype_name(dtype) << " not supported (fp32, bf16)");
      if (sh.h_k == 0) sh.h_k = sh.h;
      if (sh.d_v == 0) sh.d_v = sh.d;
      sh.prompt.assign(static_cast<std::size_t>(sh.b), prompt_len);
      return;
    }
    RA_CHECK_ARG(!mla,
                 "--mla: synthetic mode only (files: `mpirun -np P ringattn mla` shards a "
                 "latent cache for one decode call)");
    RA_CHECK_ARG(vm["prompt-len"].defaulted() && vm["batch"].defaulted() && !check,
                 "--prompt-len/--batch/--check: synthetic options cannot be combined with "
                 "--prompt-q/k/v");
    require(vm, "prompt-q");
    require(vm, "prompt-k");
    require(vm, "prompt-v");
    for (const char* o : {"decode-k", "decode-v"})
      RA_CHECK_ARG(vm.count(o) == vm.count("decode-q"),
                   "--decode-q/k/v: give all three or none (--" << o << ")");
    for (const char* o : {"extend-k", "extend-v"})
      RA_CHECK_ARG(vm.count(o) == vm.count("extend-q"),
                   "--extend-q/k/v: give all three or none (--" << o << ")");
    if (rank != 0) return;
    if (!out_dir.empty()) {  // fail before computing, not half-way through writing
      std::error_code ec;
      std::filesystem::create_directories(out_dir, ec);
      const std::string probe = out_dir + "/.ringattn_write_test";
      std::ofstream f(probe);
      RA_CHECK(f.good(), IoError, "--out-dir: cannot write into '" << out_dir << "'");
      f.close();
      std::filesystem::remove(probe, ec);
    }
    sh.varlen = vm.count("prompt-cu-seqlens") > 0;
    const int nd = sh.varlen ? 3 : 4, hd = nd - 2;
    const NpyArray q = load_tensor("--prompt-q", pq_path, nd);
    const NpyArray k = load_tensor("--prompt-k", pk_path, nd);
    const NpyArray v = load_tensor("--prompt-v", pv_path, nd);
    for (int i = 0; i < hd; ++i) {
      check_dim("--prompt-k", k, i, "--prompt-q", q, i, i == 0 && !sh.varlen ? "batch" : "tokens");
      check_dim("--prompt-v", v, i, "--prompt-q", q, i, i == 0 && !sh.varlen ? "batch" : "tokens");
    }
    check_dim("--prompt-v", v, hd, "--prompt-k", k, hd, "kv heads");
    check_dim("--prompt-k", k, hd + 1, "--prompt-q", q, hd + 1, "head dim");
    sh.h = static_cast<int>(q.shape[hd]);
    sh.h_k = static_cast<int>(k.shape[hd]);
    sh.d = static_cast<int>(q.shape[hd + 1]);
    sh.d_v = static_cast<int>(v.shape[hd + 1]);
    if (sh.varlen) {
      const NpyArray c = load_npy_arg("--prompt-cu-seqlens", pcu_path);
      RA_CHECK_ARG(
          c.ndim() == 1 && c.shape[0] >= 2,
          "--prompt-cu-seqlens: expected [b+1] with b >= 1, got " << shape_to_string(c.shape));
      const auto cu = c.to_i32("--prompt-cu-seqlens");
      RA_CHECK_ARG_EQ(cu[0], 0, "--prompt-cu-seqlens: first entry");
      RA_CHECK_ARG_EQ(static_cast<std::int64_t>(cu.back()), q.shape[0],
                      "--prompt-cu-seqlens: last entry must equal --prompt-q total tokens");
      sh.b = static_cast<int>(cu.size()) - 1;
      sh.prompt.clear();
      for (int i = 0; i < sh.b; ++i) {
        RA_CHECK_ARG(cu[i + 1] >= cu[i], "--prompt-cu-seqlens: must be non-decreasing, got "
                                             << cu[i] << " then " << cu[i + 1]);
        sh.prompt.push_back(cu[i + 1] - cu[i]);
        pbase.push_back(cu[i]);
      }
    } else {
      sh.b = static_cast<int>(q.shape[0]);
      sh.prompt.assign(static_cast<std::size_t>(sh.b), q.shape[1]);
      for (int i = 0; i < sh.b; ++i) pbase.push_back(i * q.shape[1]);
    }
    pq = to_storage(q, dtype);
    pk = to_storage(k, dtype);
    pv = to_storage(v, dtype);
    sh.steps = 0;
    sh.t = 1;
    if (vm.count("decode-q")) {
      const NpyArray a = load_tensor("--decode-q", dq_path, 5);
      const NpyArray bk = load_tensor("--decode-k", dk_path, 5);
      const NpyArray bv = load_tensor("--decode-v", dv_path, 5);
      check_shape("--decode-q", a, {a.shape[0], sh.b, a.shape[2], sh.h, sh.d}, "[T, b, t, h, d]");
      check_shape("--decode-k", bk, {a.shape[0], sh.b, a.shape[2], sh.h_k, sh.d},
                  "[T, b, t, h_k, d]");
      check_shape("--decode-v", bv, {a.shape[0], sh.b, a.shape[2], sh.h_k, sh.d_v},
                  "[T, b, t, h_k, d_v]");
      RA_CHECK_ARG(a.shape[2] >= 1, "--decode-q: tokens per step t must be >= 1");
      sh.steps = static_cast<int>(a.shape[0]);
      sh.t = static_cast<int>(a.shape[2]);
      dq = to_storage(a, dtype);
      dk = to_storage(bk, dtype);
      dv = to_storage(bv, dtype);
    }
    sh.s1 = 0;
    if (vm.count("extend-q")) {
      const NpyArray a = load_tensor("--extend-q", eq_path, 4);
      const NpyArray bk = load_tensor("--extend-k", ek_path, 4);
      const NpyArray bv = load_tensor("--extend-v", ev_path, 4);
      check_shape("--extend-q", a, {sh.b, a.shape[1], sh.h, sh.d}, "[b, S1, h, d]");
      check_shape("--extend-k", bk, {sh.b, a.shape[1], sh.h_k, sh.d}, "[b, S1, h_k, d]");
      check_shape("--extend-v", bv, {sh.b, a.shape[1], sh.h_k, sh.d_v}, "[b, S1, h_k, d_v]");
      RA_CHECK_ARG(a.shape[1] >= 1, "--extend-q: S1 must be >= 1");
      sh.s1 = static_cast<int>(a.shape[1]);
      eq = to_storage(a, dtype);
      ek = to_storage(bk, dtype);
      ev = to_storage(bv, dtype);
    }
  });

  // Files mode: rank 0 tells the others the shapes and sends the replicated tensors.
  if (files) {
    std::int64_t hdr[9] = {sh.b, sh.h, sh.h_k, sh.d, sh.d_v, sh.steps, sh.t, sh.s1, sh.varlen};
    RA_MPI_CHECK(MPI_Bcast(hdr, 9, MPI_INT64_T, 0, comm.get()));
    sh.b = static_cast<int>(hdr[0]);
    sh.h = static_cast<int>(hdr[1]);
    sh.h_k = static_cast<int>(hdr[2]);
    sh.d = static_cast<int>(hdr[3]);
    sh.d_v = static_cast<int>(hdr[4]);
    sh.steps = static_cast<int>(hdr[5]);
    sh.t = static_cast<int>(hdr[6]);
    sh.s1 = static_cast<int>(hdr[7]);
    sh.varlen = hdr[8] != 0;
    sh.prompt.resize(static_cast<std::size_t>(sh.b));
    pbase.resize(static_cast<std::size_t>(sh.b));
    RA_MPI_CHECK(MPI_Bcast(sh.prompt.data(), sh.b, MPI_INT64_T, 0, comm.get()));
    RA_MPI_CHECK(MPI_Bcast(pbase.data(), sh.b, MPI_INT64_T, 0, comm.get()));
    const std::size_t es = dtype_size(dtype);
    const auto rows = std::int64_t{sh.steps} * sh.b * sh.t, erows = std::int64_t{sh.b} * sh.s1;
    dq.resize(static_cast<std::size_t>(rows * sh.h * sh.d) * es);
    dk.resize(static_cast<std::size_t>(rows * sh.h_k * sh.d) * es);
    dv.resize(static_cast<std::size_t>(rows * sh.h_k * sh.d_v) * es);
    eq.resize(static_cast<std::size_t>(erows * sh.h * sh.d) * es);
    ek.resize(static_cast<std::size_t>(erows * sh.h_k * sh.d) * es);
    ev.resize(static_cast<std::size_t>(erows * sh.h_k * sh.d_v) * es);
    for (auto* buf : {&dq, &dk, &dv, &eq, &ek, &ev})
      comm::broadcast_bytes(comm, 0, buf->data(), buf->size());
  }

  const std::size_t es = dtype_size(dtype);
  const std::int64_t qr = std::int64_t{sh.h} * sh.d, kr = std::int64_t{sh.h_k} * sh.d,
                     vr = std::int64_t{sh.h_k} * sh.d_v, orow = std::int64_t{sh.h} * sh.d_v;
  SessionConfig cfg;
  cfg.dtype = dtype;
  cfg.b = sh.b;
  cfg.h = sh.h;
  cfg.h_k = sh.h_k;
  cfg.d = sh.d;
  cfg.d_v = sh.d_v;
  cfg.page_size = page_size;
  cfg.capacity = std::max<std::int64_t>(1, sh.capacity());
  cfg.layout = cache_layout;
  cfg.prefill_layout = prefill_layout;
  cfg.mask = mask_params;
  // --sinks [h]: every rank reads the file (the session checks that they agree); applied
  // once per output row, after the merge.
  std::vector<float> sinks;
  comm::run_collectively(comm, [&] {
    RA_CHECK(
        mask_params.attention_chunk == 0, UnsupportedError,
        "--attention-chunk: not supported by sessions (got " << mask_params.attention_chunk << ")");
    sinks = load_sinks(mask_args, sh.h);
  });
  if (!sinks.empty()) cfg.mask.sinks = sinks.data();
  cfg.mask.causal = false;  // the session's own rule (always causal)
  Engine engine = [&] {
    std::unique_ptr<Engine> e;
    comm::run_collectively(comm, [&] { e = std::make_unique<Engine>(make_engine(kernel_args)); });
    return std::move(*e);
  }();
  if (mla) {
    MlaSessionRun r;
    r.b = sh.b;
    r.h_q = sh.h;
    r.steps = sh.steps;
    r.t = sh.t;
    r.prompt = prompt_len;
    r.dtype = dtype;
    r.seed = seed;
    r.page_size = page_size;
    r.layout = cache_layout;
    r.prompt_layout = prefill_layout;
    r.scale = mask_params.scale;
    r.sinks = cfg.mask.sinks;
    r.root = reduce_to_root ? 0 : -1;
    r.merge_barrier = merge_barrier;
    r.check = check;
    r.json = json;
    return run_mla_session(comm, engine, r);
  }
  KvSession session(comm, engine, cfg);
  session.set_merge_after_barrier(merge_barrier);

  // Synthetic element (tensor 0 = q, 1 = k, 2 = v) of sequence s at position pos.
  const std::int64_t cap = cfg.capacity;
  auto synth_rows = [&](int tensor, int s, std::int64_t pos, std::int64_t n, std::int64_t row,
                        std::byte* dst) {
    fill_synthetic(seed, tensor, (std::int64_t{s} * cap + pos) * row, n * row, dtype, dst);
  };

  // ---- prefill: this rank's shard rows ----
  std::vector<std::pair<int, std::int64_t>> mine;  // (sequence, position) of local rows
  for (int s = 0; s < sh.b; ++s)
    for (auto pos : session.prefill_positions(sh.prompt[static_cast<std::size_t>(s)]))
      mine.push_back({s, pos});
  const auto t_r = static_cast<std::int64_t>(mine.size());
  std::vector<std::byte> q(static_cast<std::size_t>(t_r * qr) * es),
      k(static_cast<std::size_t>(t_r * kr) * es), v(static_cast<std::size_t>(t_r * vr) * es);
  const auto spans_of = [&](int r) {
    comm::RowSpans spans;
    for (int s = 0; s < sh.b; ++s)
      for (const auto& c :
           shard_chunks(prefill_layout, sh.prompt[static_cast<std::size_t>(s)], P, r))
        spans.push_back({pbase[static_cast<std::size_t>(s)] + c.first, c.count, c.stride});
    return spans;
  };
  if (files) {
    comm::scatter_rows(comm, 0, pq.data(), static_cast<std::size_t>(qr) * es, spans_of, q.data());
    comm::scatter_rows(comm, 0, pk.data(), static_cast<std::size_t>(kr) * es, spans_of, k.data());
    comm::scatter_rows(comm, 0, pv.data(), static_cast<std::size_t>(vr) * es, spans_of, v.data());
  } else {
    // Rows are independent: generated on the engine's threads (long contexts have
    // billions of values; the queries are not needed without the prefill's attention).
#pragma omp parallel for num_threads(engine.threads()) schedule(static)
    for (std::int64_t r = 0; r < t_r; ++r) {
      const auto [s, pos] = mine[static_cast<std::size_t>(r)];
      if (!skip_prefill)
        synth_rows(0, s, pos, 1, qr, q.data() + static_cast<std::size_t>(r * qr) * es);
      synth_rows(1, s, pos, 1, kr, k.data() + static_cast<std::size_t>(r * kr) * es);
      synth_rows(2, s, pos, 1, vr, v.data() + static_cast<std::size_t>(r * vr) * es);
    }
  }
  std::vector<float> p_out(static_cast<std::size_t>(t_r * orow)),
      p_lse(static_cast<std::size_t>(t_r * sh.h));
  comm.barrier();
  const double t_session = now_seconds();
  const StepStats pst = session.prefill(sh.prompt, q.data(), k.data(), v.data(), p_out.data(),
                                        p_lse.data(), !skip_prefill);

  // ---- decode steps ----
  const int root = reduce_to_root ? 0 : -1;
  const std::int64_t step_rows = std::int64_t{sh.b} * sh.t;
  std::vector<float> d_out(static_cast<std::size_t>(sh.steps * step_rows * orow)),
      d_lse(static_cast<std::size_t>(sh.steps * step_rows * sh.h));
  // Per step: the reduction's own cost, the mean imbalance wait and the old measure (the
  // slowest rank's time inside the reduction, waiting included), each over the step.
  std::vector<double> step_s, merge_share, imbalance_share, reduction_share, max_wait_share;
  std::vector<double> local_sum(static_cast<std::size_t>(P), 0.0);  // rank 0: per-rank sums
  std::vector<std::byte> sq(static_cast<std::size_t>(step_rows * qr) * es),
      sk(static_cast<std::size_t>(step_rows * kr) * es),
      sv(static_cast<std::size_t>(step_rows * vr) * es);
  double decode_bytes = 0.0;
  for (int st = 0; st < sh.steps; ++st) {
    if (files) {
      std::copy_n(dq.begin() + st * step_rows * qr * static_cast<std::int64_t>(es), sq.size(),
                  sq.begin());
      std::copy_n(dk.begin() + st * step_rows * kr * static_cast<std::int64_t>(es), sk.size(),
                  sk.begin());
      std::copy_n(dv.begin() + st * step_rows * vr * static_cast<std::int64_t>(es), sv.size(),
                  sv.begin());
    } else {
      for (int s = 0; s < sh.b; ++s) {
        const std::int64_t pos = sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{st} * sh.t;
        const std::int64_t r = std::int64_t{s} * sh.t;
        synth_rows(0, s, pos, sh.t, qr, sq.data() + static_cast<std::size_t>(r * qr) * es);
        synth_rows(1, s, pos, sh.t, kr, sk.data() + static_cast<std::size_t>(r * kr) * es);
        synth_rows(2, s, pos, sh.t, vr, sv.data() + static_cast<std::size_t>(r * vr) * es);
      }
    }
    const StepStats ds =
        session.decode(sh.t, sq.data(), sk.data(), sv.data(), d_out.data() + st * step_rows * orow,
                       d_lse.data() + st * step_rows * sh.h, root);
    step_s.push_back(ds.total_s);
    const double step = std::max(ds.total_s, 1e-12);
    merge_share.push_back(ds.merge_s / step);
    imbalance_share.push_back(ds.wait_s / step);
    max_wait_share.push_back(ds.max_wait_s / step);
    reduction_share.push_back(max_all(comm, ds.reduce_s) / step);
    std::vector<double> locals(static_cast<std::size_t>(P));
    RA_MPI_CHECK(
        MPI_Gather(&ds.local_s, 1, MPI_DOUBLE, locals.data(), 1, MPI_DOUBLE, 0, comm.get()));
    for (int r = 0; r < P; ++r)
      local_sum[static_cast<std::size_t>(r)] += locals[static_cast<std::size_t>(r)];
    decode_bytes += ds.bytes;
  }

  // ---- extend ----
  std::vector<float> e_out(static_cast<std::size_t>(std::int64_t{sh.b} * sh.s1 * orow)),
      e_lse(static_cast<std::size_t>(std::int64_t{sh.b} * sh.s1 * sh.h));
  ExtendPlan plan;
  StepStats est;
  if (sh.s1 > 0) {
    if (!files) {
      const std::int64_t erows = std::int64_t{sh.b} * sh.s1;
      eq.resize(static_cast<std::size_t>(erows * qr) * es);
      ek.resize(static_cast<std::size_t>(erows * kr) * es);
      ev.resize(static_cast<std::size_t>(erows * vr) * es);
      for (int s = 0; s < sh.b; ++s) {
        const std::int64_t pos =
            sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{sh.steps} * sh.t;
        const std::int64_t r = std::int64_t{s} * sh.s1;
        synth_rows(0, s, pos, sh.s1, qr, eq.data() + static_cast<std::size_t>(r * qr) * es);
        synth_rows(1, s, pos, sh.s1, kr, ek.data() + static_cast<std::size_t>(r * kr) * es);
        synth_rows(2, s, pos, sh.s1, vr, ev.data() + static_cast<std::size_t>(r * vr) * es);
      }
    }
    est = session.extend(sh.s1, eq.data(), ek.data(), ev.data(), e_out.data(), e_lse.data(),
                         extend_mode, &plan, 0);
  }

  const double session_s = max_all(comm, now_seconds() - t_session);

  // ---- --check (synthetic): sampled rows against float64 ----
  double max_err = 0.0, max_lse_err = 0.0;
  if (check) {
    auto check_row = [&](int s, std::int64_t pos, const float* o, const float* l,
                         std::int64_t l_stride) {
      RowRefProblem rp;
      rp.h = sh.h;
      rp.h_k = sh.h_k;
      rp.d = sh.d;
      rp.d_v = sh.d_v;
      rp.s_k = pos + 1;
      rp.row = pos;
      rp.shift = 0;
      rp.mask = mask_params;
      rp.mask.sinks = cfg.mask.sinks;
      std::vector<double> ro(static_cast<std::size_t>(orow)), rl(static_cast<std::size_t>(sh.h));
      reference_row(
          rp,
          [&](int hh, int c) {
            return synthetic_value(seed, 0, (std::int64_t{s} * cap + pos) * qr + hh * sh.d + c,
                                   dtype);
          },
          [&](std::int64_t j, int hk, int c) {
            return synthetic_value(seed, 1, (std::int64_t{s} * cap + j) * kr + hk * sh.d + c,
                                   dtype);
          },
          [&](std::int64_t j, int hk, int c) {
            return synthetic_value(seed, 2, (std::int64_t{s} * cap + j) * vr + hk * sh.d_v + c,
                                   dtype);
          },
          ro.data(), rl.data());
      for (std::int64_t e = 0; e < orow; ++e)
        max_err = std::max(max_err, std::abs(double(o[e]) - ro[static_cast<std::size_t>(e)]));
      for (int hh = 0; hh < sh.h; ++hh) {
        const double a = l[hh * l_stride], b = rl[static_cast<std::size_t>(hh)];
        const double err = (std::isinf(a) && std::isinf(b) && a == b)
                               ? 0.0
                               : std::abs(a - b) / std::max(1.0, std::abs(b));
        max_lse_err = std::max(max_lse_err, std::isnan(err) ? 1e30 : err);
      }
    };
    for (int c = 0; c < check_rows && t_r > 0 && !skip_prefill; ++c) {
      const std::int64_t r = (c * (t_r - 1)) / std::max(1, check_rows - 1);
      check_row(mine[static_cast<std::size_t>(r)].first, mine[static_cast<std::size_t>(r)].second,
                p_out.data() + r * orow, p_lse.data() + r, t_r);
    }
    if (rank == 0) {
      for (int st : {0, sh.steps - 1}) {
        if (st < 0 || st >= sh.steps) continue;  // (no decode steps: nothing to check)
        for (int s = 0; s < sh.b; ++s)
          for (int i = 0; i < sh.t; ++i) {
            const std::int64_t pos =
                sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{st} * sh.t + i;
            check_row(s, pos, d_out.data() + (st * step_rows + std::int64_t{s} * sh.t + i) * orow,
                      d_lse.data() + st * step_rows * sh.h + std::int64_t{s} * sh.h * sh.t + i,
                      sh.t);
          }
      }
      for (int s = 0; s < sh.b && sh.s1 > 0; ++s)
        for (int i : {0, sh.s1 / 2, sh.s1 - 1}) {
          const std::int64_t pos =
              sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{sh.steps} * sh.t + i;
          check_row(s, pos, e_out.data() + (std::int64_t{s} * sh.s1 + i) * orow,
                    e_lse.data() + std::int64_t{s} * sh.h * sh.s1 + i, sh.s1);
        }
    }
    max_err = max_all(comm, max_err);
    max_lse_err = max_all(comm, max_lse_err);
  }

  // ---- gather the prefill output (files mode) ----
  std::vector<float> po_all, pl_rows_all;
  if (files && !out_dir.empty()) {
    std::int64_t total = 0;
    for (auto l : sh.prompt) total += l;
    std::vector<float> lrows(static_cast<std::size_t>(t_r * sh.h));  // [rows, h]
    for (std::int64_t r = 0; r < t_r; ++r)
      for (int hh = 0; hh < sh.h; ++hh)
        lrows[static_cast<std::size_t>(r * sh.h + hh)] =
            p_lse[static_cast<std::size_t>(hh * t_r + r)];
    if (rank == 0) {
      po_all.resize(static_cast<std::size_t>(total * orow));
      pl_rows_all.resize(static_cast<std::size_t>(total * sh.h));
    }
    comm::gather_rows(comm, 0, p_out.data(), static_cast<std::size_t>(orow) * 4, spans_of,
                      po_all.data());
    comm::gather_rows(comm, 0, lrows.data(), static_cast<std::size_t>(sh.h) * 4, spans_of,
                      pl_rows_all.data());
  }

  const double ttft = pst.total_s;
  const double step_med = median(step_s), step_p99 = percentile(step_s, 0.99);
  const double merge_med = median(merge_share), imbalance_med = median(imbalance_share),
               reduction_med = median(reduction_share), max_wait_med = median(max_wait_share);
  double decode_tok_s = step_med > 0 ? double(sh.b) * sh.t / step_med : 0.0;
  const double prefill_bytes = max_all(comm, pst.bytes);
  if (rank == 0) {
    if (files && !out_dir.empty()) {
      std::int64_t total = 0;
      for (auto l : sh.prompt) total += l;
      const std::int64_t s0 = sh.prompt.empty() ? 0 : sh.prompt[0];
      write_f32("--out-dir", out_dir + "/prefill_out.npy",
                sh.varlen ? std::vector<std::int64_t>{total, sh.h, sh.d_v}
                          : std::vector<std::int64_t>{sh.b, s0, sh.h, sh.d_v},
                po_all.data());
      std::vector<float> t(pl_rows_all.size());
      for (std::int64_t g = 0; g < total; ++g)
        for (int hh = 0; hh < sh.h; ++hh) {
          const std::int64_t dst = sh.varlen
                                       ? hh * total + g
                                       : ((g / std::max<std::int64_t>(s0, 1)) * sh.h + hh) * s0 +
                                             g % std::max<std::int64_t>(s0, 1);
          t[static_cast<std::size_t>(dst)] = pl_rows_all[static_cast<std::size_t>(g * sh.h + hh)];
        }
      write_f32("--out-dir", out_dir + "/prefill_lse.npy",
                sh.varlen ? std::vector<std::int64_t>{sh.h, total}
                          : std::vector<std::int64_t>{sh.b, sh.h, s0},
                t.data());
      if (sh.steps > 0) {
        write_f32("--out-dir", out_dir + "/decode_out.npy", {sh.steps, sh.b, sh.t, sh.h, sh.d_v},
                  d_out.data());
        write_f32("--out-dir", out_dir + "/decode_lse.npy", {sh.steps, sh.b, sh.h, sh.t},
                  d_lse.data());
      }
      if (sh.s1 > 0) {
        write_f32("--out-dir", out_dir + "/extend_out.npy", {sh.b, sh.s1, sh.h, sh.d_v},
                  e_out.data());
        write_f32("--out-dir", out_dir + "/extend_lse.npy", {sh.b, sh.h, sh.s1}, e_lse.data());
      }
    }
    if (json) {
      Json j;
      j["command"] = "session";
      j["version"] = version();
      j["ranks"] = P;
      j["threads"] = engine.threads();
      j["backend"] = engine.backend_name();
      j["dtype"] = dtype_name(dtype);
      j["batch"] = sh.b;
      j["prompt_max"] = sh.prompt_max();
      j["heads"] = sh.h;
      j["kv_heads"] = sh.h_k;
      j["dim"] = sh.d;
      j["dim_v"] = sh.d_v;
      j["page_size"] = page_size;
      j["cache_layout"] = cache_layout_name(cache_layout);
      j["prefill_layout"] = layout_name(prefill_layout);
      j["time_s"] = json_number(session_s);
      j["ttft_s"] = json_number(ttft);
      j["prefill_attention"] = !skip_prefill;
      j["prefill_bytes_per_rank"] = json_number(prefill_bytes);
      j["decode_steps"] = sh.steps;
      j["decode_tokens_per_step"] = sh.t;
      j["decode_step_median_s"] = json_number(step_med);
      j["decode_step_p99_s"] = json_number(step_p99);
      // decode_merge_share: the reduction's own cost (StepStats::merge_s); the time ranks
      // wait in it for the slowest rank is decode_imbalance_share (mean over ranks) and
      // decode_max_wait_share (the fastest rank); decode_reduction_share is the slowest
      // rank's whole time inside the reduction (merge + wait, the measure before the split).
      j["decode_merge_share"] = json_number(merge_med);
      j["decode_imbalance_share"] = json_number(imbalance_med);
      j["decode_max_wait_share"] = json_number(max_wait_med);
      j["decode_reduction_share"] = json_number(reduction_med);
      j["decode_merge_after_barrier"] = merge_barrier;
      Json per_rank = Json::array();
      for (double x : local_sum) per_rank.push_back(json_number(x / std::max(1, sh.steps)));
      j["decode_local_mean_s_per_rank"] = per_rank;
      j["decode_tokens_per_s"] = json_number(decode_tok_s);
      j["decode_bytes_per_rank"] = json_number(decode_bytes);
      j["extend_len"] = sh.s1;
      if (sh.s1 > 0) {
        j["extend_s"] = json_number(est.total_s);
        j["extend_mode"] = extend_mode_name(plan.mode);
        j["extend_why"] = plan.why;
        j["extend_bytes_per_rank"] = json_number(est.bytes);
      }
      if (check) {
        j["max_abs_err"] = json_number(max_err);
        j["max_lse_rel_err"] = json_number(max_lse_err);
      }
      std::printf("%s\n", json_dump(j).c_str());
    } else {
      std::printf(
          "session: ranks=%d threads=%d backend=%s dtype=%s b=%d prompt=%lld h=%d h_k=%d d=%d "
          "d_v=%d page=%d cache=%s | ttft %.4f s | decode %d x %d tok: step median %.3f ms, "
          "p99 %.3f ms, merge %.2f%%, imbalance wait %.1f%% (max %.1f%%), in reduction "
          "%.1f%%, %.1f tok/s",
          P, engine.threads(), engine.backend_name().c_str(), dtype_name(dtype), sh.b,
          static_cast<long long>(sh.prompt_max()), sh.h, sh.h_k, sh.d, sh.d_v, page_size,
          cache_layout_name(cache_layout), ttft, sh.steps, sh.t, step_med * 1e3, step_p99 * 1e3,
          merge_med * 100.0, imbalance_med * 100.0, max_wait_med * 100.0, reduction_med * 100.0,
          decode_tok_s);
      if (sh.s1 > 0)
        std::printf(" | extend %d tok: %.4f s %s (%s)", sh.s1, est.total_s,
                    extend_mode_name(plan.mode), plan.why.c_str());
      if (check)
        std::printf(" | check: max abs err %.3g, max LSE rel err %.3g", max_err, max_lse_err);
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  const double tol = dtype == DType::kF32 ? 1e-4 : 3e-2;
  if (check && (max_err > tol || max_lse_err > tol)) {
    if (rank == 0)
      std::fprintf(stderr,
                   "ringattn session: error: --check failed: max abs err %g (tolerance %g)\n",
                   max_err, tol);
    return 1;
  }
  return 0;
}

}  // namespace ringattn::cli
