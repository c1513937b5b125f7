// `ringattn session` (under mpirun): an inference session over a KV cache sharded across
// the ranks (kv_session.hpp): prefill of a prompt, T decode steps of t tokens, an optional
// follow-up prefill ("extend") against the whole cached context.
//   files mode      rank 0 reads --prompt-q/k/v ([b, S0, h, *] or varlen [total, h, *] with
//                   --prompt-cu-seqlens), --decode-q/k/v ([T, b, t, h, *]) and
//                   --extend-q/k/v ([b, S1, h, *]); --out-dir DIR gets the outputs (fp32).
//   synthetic mode  --batch --prompt-len --decode-steps --decode-tokens --extend-len with
//                   deterministic values each rank generates for its own tokens; --check
//                   compares sampled rows with a float64 computation.
//   --mla           (synthetic mode) an MLA decode session over a sharded latent cache
//                   instead (session_mla.hpp).
// Prints one result line on rank 0 (or a JSON object with --json): time to first token,
// decode step latency (median, p99), the merge's and the imbalance wait's shares of a
// step, extend time and mode.
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

#include "cli/args.hpp"
#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "cli/session_mla.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/kv_session.hpp"

namespace ringattn::cli {

namespace {

const char* kUsage =
    "usage: mpirun -np P ringattn session [options]\n"
    "An inference session over a KV cache sharded across the ranks: prefill, decode steps,\n"
    "extend. Files mode (--prompt-q/k/v, --decode-q/k/v, --extend-q/k/v, --out-dir) or\n"
    "synthetic mode (--batch --prompt-len --decode-steps --extend-len, --check);\n"
    "--mla: an MLA decode session over a sharded latent cache (synthetic mode).\n";

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const auto i = static_cast<std::size_t>(std::ceil(p * static_cast<double>(v.size())) - 1);
  return v[std::min(i, v.size() - 1)];
}

// The options of `ringattn session`, each declared once (cli/args.hpp).
struct SessionArgs : MpiCommandArgs {
  // files mode
  std::string prompt_q, prompt_k, prompt_v, prompt_cu_seqlens;
  std::string decode_q, decode_k, decode_v, extend_q, extend_k, extend_v, out_dir;
  // synthetic mode
  int batch = 1;
  std::int64_t prompt_len = 0;
  int decode_steps = 0, decode_tokens = 1, extend_len = 0;
  HeadArgs heads;
  std::uint64_t seed = 0;
  bool check = false;
  int check_rows = 2;
  // session
  int page_size = 256;
  std::string cache_layout = "round-robin";
  std::string prefill_layout = "zigzag";
  std::string extend_mode = "auto";
  bool reduce_to_root = false;
  bool merge_after_barrier = false;
  bool skip_prefill = false;
  bool json = false;
  // MLA
  bool mla = false;

  template <class V>
  void for_each(V& f) {
    f.group("Files mode (read/written on rank 0)");
    f(prompt_q, {"prompt-q", "prompt queries [b, S0, h, d] or varlen [total, h, d]", kNoDefault});
    f(prompt_k, {"prompt-k", "prompt keys [b, S0, h_k, d] / [total, h_k, d]", kNoDefault});
    f(prompt_v, {"prompt-v", "prompt values [b, S0, h_k, d_v] / [total, h_k, d_v]", kNoDefault});
    f(prompt_cu_seqlens,
      {"prompt-cu-seqlens", "varlen prompts: offsets [b+1] (int32/int64)", kNoDefault});
    f(decode_q, {"decode-q", "decode queries [T, b, t, h, d]", kNoDefault});
    f(decode_k, {"decode-k", "decode keys [T, b, t, h_k, d]", kNoDefault});
    f(decode_v, {"decode-v", "decode values [T, b, t, h_k, d_v]", kNoDefault});
    f(extend_q, {"extend-q", "extend queries [b, S1, h, d]", kNoDefault});
    f(extend_k, {"extend-k", "extend keys [b, S1, h_k, d]", kNoDefault});
    f(extend_v, {"extend-v", "extend values [b, S1, h_k, d_v]", kNoDefault});
    f(out_dir,
      {"out-dir", "write prefill_/decode_/extend_ out.npy and lse.npy (fp32) here", kNoDefault});
    f.group("Synthetic mode (each rank generates its own tokens)");
    f(batch, kBatchFlag);
    f(prompt_len, {"prompt-len", "prompt tokens S0"});
    f(decode_steps, {"decode-steps", "decode steps T"});
    f(decode_tokens, {"decode-tokens", "tokens per decode step t"});
    f(extend_len, {"extend-len", "extend tokens S1 (0 = none)"});
    heads.for_each(f);
    f(seed, kSeedFlag);
    f(check, {"check", "verify sampled rows against float64"});
    f(check_rows, {"check-rows", "prefill rows per rank checked with --check"});
    f.group("Session");
    f(page_size, {"page-size", "tokens per cache page (and per round-robin block)"});
    f(cache_layout, {"cache-layout",
                     "owner of appended tokens: round-robin (blocks of page-size tokens) | "
                     "contiguous"});
    f(prefill_layout,
      {"prefill-layout", "prompt shards of the prefill ring: zigzag | contiguous | striped"});
    f(extend_mode, {"extend-mode", "auto (cost model) | pass-q | pass-kv"});
    f(reduce_to_root,
      {"reduce-to-root", "decode: reduce the partials to rank 0 instead of an allreduce"});
    f(merge_after_barrier, {"merge-after-barrier",
                            "decode measurement mode: a barrier before each step's merge "
                            "reduction, which then times the merge alone"});
    f(skip_prefill, {"skip-prefill-attention",
                     "store the prompt's K/V without computing its attention (decode/extend "
                     "benchmarks over long contexts; no prefill outputs)"});
    f(json, kJsonFlag);
    f.group("MLA (synthetic mode)");
    f(mla, {"mla",
            "DeepSeek MLA: a latent cache [*, 576] sharded across the ranks, prompt latents "
            "stored without attention, decode steps over it; --heads = query heads, --dtype "
            "= queries and cache (fp32 | bf16)"});
    mask_and_kernel(f, "Mask (the session is causal)");
  }
  bool files() const {
    return given(vm, "prompt-q") || given(vm, "prompt-k") || given(vm, "prompt-v");
  }
};

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
  std::int64_t prompt_total() const {
    std::int64_t total = 0;
    for (auto l : prompt) total += l;
    return total;
  }
  // Elements per token row of q, k, v and the output.
  std::int64_t q_row() const { return std::int64_t{h} * d; }
  std::int64_t k_row() const { return std::int64_t{h_k} * d; }
  std::int64_t v_row() const { return std::int64_t{h_k} * d_v; }
  std::int64_t out_row() const { return std::int64_t{h} * d_v; }
};

// The parsed options and the inputs, before the session starts.
struct SessionSetup {
  bool files = false;
  int ranks = 1, rank = 0;
  DType dtype{};
  MaskParams mask;
  CacheLayout cache_layout{};
  ShardLayout prefill_layout{};
  ExtendMode extend_mode{};
  Shape sh;
  // Rank 0, files mode: whole prompt tensors (storage dtype) and their row offsets.
  std::vector<std::byte> pq, pk, pv;
  std::vector<std::int64_t> pbase;
  // Every rank: decode [T, b, t, ...] and extend [b, S1, ...] tensors (storage dtype).
  std::vector<std::byte> dq, dk, dv, eq, ek, ev;
  std::vector<float> sinks;
  std::int64_t cap = 0;  // cache capacity per sequence (SessionConfig::capacity)

  // Synthetic rows: n rows of `row` elements of tensor (0 = q, 1 = k, 2 = v) of
  // sequence s from position pos on.
  void synth_rows(std::uint64_t seed, int tensor, int s, std::int64_t pos, std::int64_t n,
                  std::int64_t row, std::byte* dst) const {
    fill_synthetic(seed, tensor, (std::int64_t{s} * cap + pos) * row, n * row, dtype, dst);
  }
};

// What the session computed, and its timings.
struct SessionResults : StepShares {
  std::vector<std::pair<int, std::int64_t>> mine;  // (sequence, position) of local rows
  std::int64_t t_r = 0;                            // local prefill rows
  std::vector<float> p_out, p_lse;                 // [t_r, h, d_v], [h, t_r]
  StepStats pst;
  std::vector<float> d_out, d_lse;  // [T, b, t, h, d_v], [T, b, h, t]
  std::vector<double> local_sum;    // rank 0: per rank, the sum of its local decode times
  double decode_bytes = 0.0;
  std::vector<float> e_out, e_lse;  // [b, S1, h, d_v], [b, h, S1]
  ExtendPlan plan;
  StepStats est;
  double t_start = 0.0;    // this rank's clock when the prefill starts
  double session_s = 0.0;  // prefill to end of extend, slowest rank
};

// Synthetic mode: the shape from the options.
void synthetic_shape(const SessionArgs& a, Shape& sh) {
  RA_CHECK_ARG(!given(a.vm, "out-dir") && !given(a.vm, "decode-q") && !given(a.vm, "extend-q"),
               "--out-dir/--decode-*/--extend-*: only valid with --prompt-q/k/v (files mode)");
  const std::int64_t prompt_len = a.prompt_len;  // the checks name the variables
  sh.b = a.batch;
  sh.steps = a.decode_steps;
  sh.t = a.decode_tokens;
  sh.s1 = a.extend_len;
  RA_CHECK_ARG_GT(sh.b, 0, "--batch");
  RA_CHECK_ARG_GE(prompt_len, 1, "--prompt-len (or --prompt-q/k/v files) is required");
  RA_CHECK_ARG_GE(sh.steps, 0, "--decode-steps");
  RA_CHECK_ARG_GE(sh.t, 1, "--decode-tokens");
  RA_CHECK_ARG_GE(sh.s1, 0, "--extend-len");
  HeadArgs heads = a.heads;
  heads.resolve();
  sh.h = heads.heads;
  sh.h_k = heads.kv_heads;
  sh.d = heads.dim;
  sh.d_v = heads.dim_v;
  sh.prompt.assign(static_cast<std::size_t>(sh.b), prompt_len);
}

// --mla (synthetic mode): what an MLA decode session takes (decode steps only).
void check_mla(const SessionArgs& a, const SessionSetup& st) {
  RA_CHECK_ARG(st.sh.s1 == 0 && st.mask.window_left < 0 && st.mask.softcap == 0.0f &&
                   !given(a.vm, "kv-heads") && !given(a.vm, "dim") && !given(a.vm, "dim-v"),
               "--mla: decode only, no --extend-len, --window, --softcap, --kv-heads or --dim "
               "(the latent is 576 wide, one KV head)");
  RA_CHECK_ARG(st.mask.attention_chunk == 0,
               "--mla: --attention-chunk "
                   << st.mask.attention_chunk
                   << " not supported (MLA decode has no chunked attention)");
  RA_CHECK(st.dtype == DType::kF32 || st.dtype == DType::kBF16, UnsupportedError,
           "--mla: --dtype " << dtype_name(st.dtype) << " not supported (fp32, bf16)");
}

// --out-dir: fail before computing, not half-way through writing.
void check_out_dir(const std::string& out_dir) {
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  const std::string probe = out_dir + "/.ringattn_write_test";
  std::ofstream f(probe);
  RA_CHECK(f.good(), IoError, "--out-dir: cannot write into '" << out_dir << "'");
  f.close();
  std::filesystem::remove(probe, ec);
}

// Rank 0, files mode: the prompt tensors, their shape and row offsets.
void load_prompt(const SessionArgs& a, SessionSetup& st) {
  Shape& sh = st.sh;
  sh.varlen = given(a.vm, "prompt-cu-seqlens");
  const int nd = sh.varlen ? 3 : 4, hd = nd - 2;
  const NpyArray q = load_tensor("--prompt-q", a.prompt_q, nd);
  const NpyArray k = load_tensor("--prompt-k", a.prompt_k, nd);
  const NpyArray v = load_tensor("--prompt-v", a.prompt_v, nd);
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
    const NpyArray c = load_npy_arg("--prompt-cu-seqlens", a.prompt_cu_seqlens);
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
      st.pbase.push_back(cu[i]);
    }
  } else {
    sh.b = static_cast<int>(q.shape[0]);
    sh.prompt.assign(static_cast<std::size_t>(sh.b), q.shape[1]);
    for (int i = 0; i < sh.b; ++i) st.pbase.push_back(i * q.shape[1]);
  }
  st.pq = to_storage(q, st.dtype);
  st.pk = to_storage(k, st.dtype);
  st.pv = to_storage(v, st.dtype);
}

// Rank 0, files mode: the decode steps [T, b, t, ...] and extend [b, S1, ...] tensors.
void load_decode_extend(const SessionArgs& a, SessionSetup& st) {
  Shape& sh = st.sh;
  sh.steps = 0;
  sh.t = 1;
  if (given(a.vm, "decode-q")) {
    const NpyArray q = load_tensor("--decode-q", a.decode_q, 5);
    const NpyArray k = load_tensor("--decode-k", a.decode_k, 5);
    const NpyArray v = load_tensor("--decode-v", a.decode_v, 5);
    check_shape("--decode-q", q, {q.shape[0], sh.b, q.shape[2], sh.h, sh.d}, "[T, b, t, h, d]");
    check_shape("--decode-k", k, {q.shape[0], sh.b, q.shape[2], sh.h_k, sh.d}, "[T, b, t, h_k, d]");
    check_shape("--decode-v", v, {q.shape[0], sh.b, q.shape[2], sh.h_k, sh.d_v},
                "[T, b, t, h_k, d_v]");
    RA_CHECK_ARG(q.shape[2] >= 1, "--decode-q: tokens per step t must be >= 1");
    sh.steps = static_cast<int>(q.shape[0]);
    sh.t = static_cast<int>(q.shape[2]);
    st.dq = to_storage(q, st.dtype);
    st.dk = to_storage(k, st.dtype);
    st.dv = to_storage(v, st.dtype);
  }
  sh.s1 = 0;
  if (given(a.vm, "extend-q")) {
    const NpyArray q = load_tensor("--extend-q", a.extend_q, 4);
    const NpyArray k = load_tensor("--extend-k", a.extend_k, 4);
    const NpyArray v = load_tensor("--extend-v", a.extend_v, 4);
    check_shape("--extend-q", q, {sh.b, q.shape[1], sh.h, sh.d}, "[b, S1, h, d]");
    check_shape("--extend-k", k, {sh.b, q.shape[1], sh.h_k, sh.d}, "[b, S1, h_k, d]");
    check_shape("--extend-v", v, {sh.b, q.shape[1], sh.h_k, sh.d_v}, "[b, S1, h_k, d_v]");
    RA_CHECK_ARG(q.shape[1] >= 1, "--extend-q: S1 must be >= 1");
    sh.s1 = static_cast<int>(q.shape[1]);
    st.eq = to_storage(q, st.dtype);
    st.ek = to_storage(k, st.dtype);
    st.ev = to_storage(v, st.dtype);
  }
}

// Checks every option; files mode: checks the file options and reads the files on rank 0.
void parse_and_load(const SessionArgs& a, SessionSetup& st) {
  const int page_size = a.page_size, check_rows = a.check_rows;  // named by the checks
  st.dtype = tensor_dtype(a.kernel);
  st.mask = to_mask_params(a.mask);
  RA_CHECK_ARG(st.mask.window_right <= 0, "--window: right "
                                              << st.mask.window_right
                                              << " must be 0 or -1 (the session is causal)");
  st.mask.causal = true;
  st.mask.window_right = 0;
  st.cache_layout = parse_cache_layout(a.cache_layout);
  st.prefill_layout = parse_layout(a.prefill_layout);
  st.extend_mode = parse_extend_mode(a.extend_mode);
  RA_CHECK_ARG_GE(page_size, 1, "--page-size");
  RA_CHECK_ARG_GE(check_rows, 1, "--check-rows");
  RA_CHECK_ARG(!(a.skip_prefill && given(a.vm, "out-dir")),
               "--skip-prefill-attention: no prefill outputs to write with --out-dir");
  if (!st.files) {
    synthetic_shape(a, st.sh);
    if (a.mla) check_mla(a, st);
    return;
  }
  RA_CHECK_ARG(!a.mla,
               "--mla: synthetic mode only (files: `mpirun -np P ringattn mla` shards a latent "
               "cache for one decode call)");
  RA_CHECK_ARG(!given(a.vm, "prompt-len") && !given(a.vm, "batch") && !a.check,
               "--prompt-len/--batch/--check: synthetic options cannot be combined with "
               "--prompt-q/k/v");
  require(a.vm, "prompt-q");
  require(a.vm, "prompt-k");
  require(a.vm, "prompt-v");
  for (const char* o : {"decode-k", "decode-v"})
    RA_CHECK_ARG(a.vm.count(o) == a.vm.count("decode-q"),
                 "--decode-q/k/v: give all three or none (--" << o << ")");
  for (const char* o : {"extend-k", "extend-v"})
    RA_CHECK_ARG(a.vm.count(o) == a.vm.count("extend-q"),
                 "--extend-q/k/v: give all three or none (--" << o << ")");
  if (st.rank != 0) return;
  if (!a.out_dir.empty()) check_out_dir(a.out_dir);
  load_prompt(a, st);
  load_decode_extend(a, st);
}

// Files mode: rank 0 tells the others the shapes and sends the replicated tensors.
void broadcast_inputs(const comm::Communicator& comm, SessionSetup& st) {
  Shape& sh = st.sh;
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
  st.pbase.resize(static_cast<std::size_t>(sh.b));
  RA_MPI_CHECK(MPI_Bcast(sh.prompt.data(), sh.b, MPI_INT64_T, 0, comm.get()));
  RA_MPI_CHECK(MPI_Bcast(st.pbase.data(), sh.b, MPI_INT64_T, 0, comm.get()));
  const std::size_t es = dtype_size(st.dtype);
  const auto rows = std::int64_t{sh.steps} * sh.b * sh.t, erows = std::int64_t{sh.b} * sh.s1;
  st.dq.resize(static_cast<std::size_t>(rows * sh.q_row()) * es);
  st.dk.resize(static_cast<std::size_t>(rows * sh.k_row()) * es);
  st.dv.resize(static_cast<std::size_t>(rows * sh.v_row()) * es);
  st.eq.resize(static_cast<std::size_t>(erows * sh.q_row()) * es);
  st.ek.resize(static_cast<std::size_t>(erows * sh.k_row()) * es);
  st.ev.resize(static_cast<std::size_t>(erows * sh.v_row()) * es);
  for (auto* buf : {&st.dq, &st.dk, &st.dv, &st.eq, &st.ek, &st.ev})
    comm::broadcast_bytes(comm, 0, buf->data(), buf->size());
}

// The session's configuration; --sinks [h] is read by every rank (the session checks
// that they agree) and applied once per output row, after the merge.
SessionConfig session_config(const comm::Communicator& comm, const SessionArgs& a,
                             SessionSetup& st) {
  const Shape& sh = st.sh;
  SessionConfig cfg;
  cfg.dtype = st.dtype;
  cfg.b = sh.b;
  cfg.h = sh.h;
  cfg.h_k = sh.h_k;
  cfg.d = sh.d;
  cfg.d_v = sh.d_v;
  cfg.page_size = a.page_size;
  cfg.capacity = std::max<std::int64_t>(1, sh.capacity());
  cfg.layout = st.cache_layout;
  cfg.prefill_layout = st.prefill_layout;
  cfg.mask = st.mask;
  comm::run_collectively(comm, [&] { st.sinks = load_sinks(a.mask, sh.h); });
  if (!st.sinks.empty()) cfg.mask.sinks = st.sinks.data();
  cfg.mask.causal = false;  // the session's own rule (always causal)
  st.cap = cfg.capacity;
  return cfg;
}

// Rank r's prompt rows in the whole prompt tensors (files mode scatter / gather).
comm::SpansOf prompt_spans(const SessionSetup& st) {
  return [&st](int r) {
    comm::RowSpans spans;
    for (int s = 0; s < st.sh.b; ++s)
      for (const auto& c :
           shard_chunks(st.prefill_layout, st.sh.prompt[static_cast<std::size_t>(s)], st.ranks, r))
        spans.push_back({st.pbase[static_cast<std::size_t>(s)] + c.first, c.count, c.stride});
    return spans;
  };
}

// Prefill: this rank's shard rows of the prompt, scattered from rank 0 or generated.
void prefill(const comm::Communicator& comm, const Engine& engine, KvSession& session,
             const SessionArgs& a, const SessionSetup& st, SessionResults& res) {
  const Shape& sh = st.sh;
  const std::size_t es = dtype_size(st.dtype);
  const std::int64_t qr = sh.q_row(), kr = sh.k_row(), vr = sh.v_row();
  for (int s = 0; s < sh.b; ++s)
    for (auto pos : session.prefill_positions(sh.prompt[static_cast<std::size_t>(s)]))
      res.mine.push_back({s, pos});
  const auto t_r = res.t_r = static_cast<std::int64_t>(res.mine.size());
  std::vector<std::byte> q(static_cast<std::size_t>(t_r * qr) * es),
      k(static_cast<std::size_t>(t_r * kr) * es), v(static_cast<std::size_t>(t_r * vr) * es);
  if (st.files) {
    const auto spans_of = prompt_spans(st);
    comm::scatter_rows(comm, 0, st.pq.data(), static_cast<std::size_t>(qr) * es, spans_of,
                       q.data());
    comm::scatter_rows(comm, 0, st.pk.data(), static_cast<std::size_t>(kr) * es, spans_of,
                       k.data());
    comm::scatter_rows(comm, 0, st.pv.data(), static_cast<std::size_t>(vr) * es, spans_of,
                       v.data());
  } else {
    // Rows are independent: generated on the engine's threads (long contexts have
    // billions of values; the queries are not needed without the prefill's attention).
#pragma omp parallel for num_threads(engine.threads()) schedule(static)
    for (std::int64_t r = 0; r < t_r; ++r) {
      const auto [s, pos] = res.mine[static_cast<std::size_t>(r)];
      if (!a.skip_prefill)
        st.synth_rows(a.seed, 0, s, pos, 1, qr, q.data() + static_cast<std::size_t>(r * qr) * es);
      st.synth_rows(a.seed, 1, s, pos, 1, kr, k.data() + static_cast<std::size_t>(r * kr) * es);
      st.synth_rows(a.seed, 2, s, pos, 1, vr, v.data() + static_cast<std::size_t>(r * vr) * es);
    }
  }
  res.p_out.resize(static_cast<std::size_t>(t_r * sh.out_row()));
  res.p_lse.resize(static_cast<std::size_t>(t_r * sh.h));
  comm.barrier();
  res.t_start = now_seconds();
  res.pst = session.prefill(sh.prompt, q.data(), k.data(), v.data(), res.p_out.data(),
                            res.p_lse.data(), !a.skip_prefill);
}

// One decode step's timings: its latency and the shares of the reduction's split
// (StepStats); rank 0 sums every rank's local time (the per-rank imbalance).
void record_step(const comm::Communicator& comm, const StepStats& ds, SessionResults& res) {
  const int P = comm.size();
  res.add(comm, ds);
  std::vector<double> locals(static_cast<std::size_t>(P));
  RA_MPI_CHECK(MPI_Gather(&ds.local_s, 1, MPI_DOUBLE, locals.data(), 1, MPI_DOUBLE, 0, comm.get()));
  for (int r = 0; r < P; ++r)
    res.local_sum[static_cast<std::size_t>(r)] += locals[static_cast<std::size_t>(r)];
  res.decode_bytes += ds.bytes;
}

// T decode steps of t tokens per sequence (files: step st's slice of --decode-q/k/v).
void decode_steps(const comm::Communicator& comm, KvSession& session, const SessionArgs& a,
                  const SessionSetup& st, SessionResults& res) {
  const Shape& sh = st.sh;
  const std::size_t es = dtype_size(st.dtype);
  const std::int64_t qr = sh.q_row(), kr = sh.k_row(), vr = sh.v_row(), orow = sh.out_row();
  const int root = a.reduce_to_root ? 0 : -1;
  const std::int64_t step_rows = std::int64_t{sh.b} * sh.t;
  res.local_sum.assign(static_cast<std::size_t>(comm.size()), 0.0);
  res.d_out.resize(static_cast<std::size_t>(sh.steps * step_rows * orow));
  res.d_lse.resize(static_cast<std::size_t>(sh.steps * step_rows * sh.h));
  std::vector<std::byte> sq(static_cast<std::size_t>(step_rows * qr) * es),
      sk(static_cast<std::size_t>(step_rows * kr) * es),
      sv(static_cast<std::size_t>(step_rows * vr) * es);
  for (int step = 0; step < sh.steps; ++step) {
    if (st.files) {
      const std::int64_t off = step * step_rows * static_cast<std::int64_t>(es);
      std::copy_n(st.dq.begin() + off * qr, sq.size(), sq.begin());
      std::copy_n(st.dk.begin() + off * kr, sk.size(), sk.begin());
      std::copy_n(st.dv.begin() + off * vr, sv.size(), sv.begin());
    } else {
      for (int s = 0; s < sh.b; ++s) {
        const std::int64_t pos = sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{step} * sh.t;
        const std::int64_t r = std::int64_t{s} * sh.t;
        st.synth_rows(a.seed, 0, s, pos, sh.t, qr,
                      sq.data() + static_cast<std::size_t>(r * qr) * es);
        st.synth_rows(a.seed, 1, s, pos, sh.t, kr,
                      sk.data() + static_cast<std::size_t>(r * kr) * es);
        st.synth_rows(a.seed, 2, s, pos, sh.t, vr,
                      sv.data() + static_cast<std::size_t>(r * vr) * es);
      }
    }
    const StepStats ds = session.decode(sh.t, sq.data(), sk.data(), sv.data(),
                                        res.d_out.data() + step * step_rows * orow,
                                        res.d_lse.data() + step * step_rows * sh.h, root);
    record_step(comm, ds, res);
  }
}

// The follow-up prefill of S1 tokens per sequence against the whole cached context.
void extend(KvSession& session, const SessionArgs& a, SessionSetup& st, SessionResults& res) {
  const Shape& sh = st.sh;
  const std::size_t es = dtype_size(st.dtype);
  const std::int64_t qr = sh.q_row(), kr = sh.k_row(), vr = sh.v_row();
  res.e_out.resize(static_cast<std::size_t>(std::int64_t{sh.b} * sh.s1 * sh.out_row()));
  res.e_lse.resize(static_cast<std::size_t>(std::int64_t{sh.b} * sh.s1 * sh.h));
  if (sh.s1 == 0) return;
  if (!st.files) {
    const std::int64_t erows = std::int64_t{sh.b} * sh.s1;
    st.eq.resize(static_cast<std::size_t>(erows * qr) * es);
    st.ek.resize(static_cast<std::size_t>(erows * kr) * es);
    st.ev.resize(static_cast<std::size_t>(erows * vr) * es);
    for (int s = 0; s < sh.b; ++s) {
      const std::int64_t pos =
          sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{sh.steps} * sh.t;
      const std::int64_t r = std::int64_t{s} * sh.s1;
      st.synth_rows(a.seed, 0, s, pos, sh.s1, qr,
                    st.eq.data() + static_cast<std::size_t>(r * qr) * es);
      st.synth_rows(a.seed, 1, s, pos, sh.s1, kr,
                    st.ek.data() + static_cast<std::size_t>(r * kr) * es);
      st.synth_rows(a.seed, 2, s, pos, sh.s1, vr,
                    st.ev.data() + static_cast<std::size_t>(r * vr) * es);
    }
  }
  res.est = session.extend(sh.s1, st.eq.data(), st.ek.data(), st.ev.data(), res.e_out.data(),
                           res.e_lse.data(), st.extend_mode, &res.plan, 0);
}

// --check (synthetic): one row at sequence s, position pos against float64.
void check_row(const SessionArgs& a, const SessionSetup& st, const MaskParams& mask, int s,
               std::int64_t pos, const float* o, const float* l, std::int64_t l_stride,
               CheckErrors& err) {
  const Shape& sh = st.sh;
  const std::int64_t qr = sh.q_row(), kr = sh.k_row(), vr = sh.v_row(), cap = st.cap;
  RowRefProblem rp;
  rp.h = sh.h;
  rp.h_k = sh.h_k;
  rp.d = sh.d;
  rp.d_v = sh.d_v;
  rp.s_k = pos + 1;
  rp.row = pos;
  rp.shift = 0;
  rp.mask = mask;
  std::vector<double> ro(static_cast<std::size_t>(sh.out_row())),
      rl(static_cast<std::size_t>(sh.h));
  const auto value = [&](int tensor, std::int64_t index) {
    return synthetic_value(a.seed, tensor, index, st.dtype);
  };
  reference_row(
      rp,
      [&](int hh, int c) { return value(0, (std::int64_t{s} * cap + pos) * qr + hh * sh.d + c); },
      [&](std::int64_t j, int hk, int c) {
        return value(1, (std::int64_t{s} * cap + j) * kr + hk * sh.d + c);
      },
      [&](std::int64_t j, int hk, int c) {
        return value(2, (std::int64_t{s} * cap + j) * vr + hk * sh.d_v + c);
      },
      ro.data(), rl.data());
  err.add_row(o, l, l_stride, ro, rl);
}

// --check: --check-rows prefill rows per rank; on rank 0 every token of the first and
// last decode steps and three extend rows per sequence; agreed across the ranks.
CheckErrors check(const comm::Communicator& comm, const SessionArgs& a, const SessionSetup& st,
                  const SessionConfig& cfg, const SessionResults& res) {
  const Shape& sh = st.sh;
  const std::int64_t orow = sh.out_row(), t_r = res.t_r;
  const std::int64_t step_rows = std::int64_t{sh.b} * sh.t;
  MaskParams mask = st.mask;
  mask.sinks = cfg.mask.sinks;
  CheckErrors err;
  for (int c = 0; c < a.check_rows && t_r > 0 && !a.skip_prefill; ++c) {
    const std::int64_t r = (c * (t_r - 1)) / std::max(1, a.check_rows - 1);
    const auto [s, pos] = res.mine[static_cast<std::size_t>(r)];
    check_row(a, st, mask, s, pos, res.p_out.data() + r * orow, res.p_lse.data() + r, t_r, err);
  }
  if (st.rank == 0) {
    for (int step : {0, sh.steps - 1}) {
      if (step < 0 || step >= sh.steps) continue;  // (no decode steps: nothing to check)
      for (int s = 0; s < sh.b; ++s)
        for (int i = 0; i < sh.t; ++i) {
          const std::int64_t pos =
              sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{step} * sh.t + i;
          check_row(a, st, mask, s, pos,
                    res.d_out.data() + (step * step_rows + std::int64_t{s} * sh.t + i) * orow,
                    res.d_lse.data() + step * step_rows * sh.h + std::int64_t{s} * sh.h * sh.t + i,
                    sh.t, err);
        }
    }
    for (int s = 0; s < sh.b && sh.s1 > 0; ++s)
      for (int i : {0, sh.s1 / 2, sh.s1 - 1}) {
        const std::int64_t pos =
            sh.prompt[static_cast<std::size_t>(s)] + std::int64_t{sh.steps} * sh.t + i;
        check_row(a, st, mask, s, pos, res.e_out.data() + (std::int64_t{s} * sh.s1 + i) * orow,
                  res.e_lse.data() + std::int64_t{s} * sh.h * sh.s1 + i, sh.s1, err);
      }
  }
  err.max_over(comm);
  return err;
}

// Files mode with --out-dir: the prefill output and LSE rows gathered on rank 0 in the
// original token order, [total, h, d_v] and [total, h].
struct GatheredPrefill {
  std::vector<float> out, lse_rows;
};
GatheredPrefill gather_prefill(const comm::Communicator& comm, const SessionSetup& st,
                               const SessionResults& res) {
  const Shape& sh = st.sh;
  const std::int64_t total = sh.prompt_total(), t_r = res.t_r, orow = sh.out_row();
  std::vector<float> lrows(static_cast<std::size_t>(t_r * sh.h));  // [rows, h]
  for (std::int64_t r = 0; r < t_r; ++r)
    for (int hh = 0; hh < sh.h; ++hh)
      lrows[static_cast<std::size_t>(r * sh.h + hh)] =
          res.p_lse[static_cast<std::size_t>(hh * t_r + r)];
  GatheredPrefill g;
  if (st.rank == 0) {
    g.out.resize(static_cast<std::size_t>(total * orow));
    g.lse_rows.resize(static_cast<std::size_t>(total * sh.h));
  }
  const auto spans_of = prompt_spans(st);
  comm::gather_rows(comm, 0, res.p_out.data(), static_cast<std::size_t>(orow) * 4, spans_of,
                    g.out.data());
  comm::gather_rows(comm, 0, lrows.data(), static_cast<std::size_t>(sh.h) * 4, spans_of,
                    g.lse_rows.data());
  return g;
}

// Rank 0: prefill_/decode_/extend_ out.npy and lse.npy in --out-dir.
void write_outputs(const std::string& out_dir, const Shape& sh, const GatheredPrefill& g,
                   const SessionResults& res) {
  const std::int64_t total = sh.prompt_total();
  const std::int64_t s0 = sh.prompt.empty() ? 0 : sh.prompt[0];
  write_f32("--out-dir", out_dir + "/prefill_out.npy",
            sh.varlen ? std::vector<std::int64_t>{total, sh.h, sh.d_v}
                      : std::vector<std::int64_t>{sh.b, s0, sh.h, sh.d_v},
            g.out.data());
  std::vector<float> t(g.lse_rows.size());
  for (std::int64_t r = 0; r < total; ++r)
    for (int hh = 0; hh < sh.h; ++hh) {
      const std::int64_t dst = sh.varlen ? hh * total + r
                                         : ((r / std::max<std::int64_t>(s0, 1)) * sh.h + hh) * s0 +
                                               r % std::max<std::int64_t>(s0, 1);
      t[static_cast<std::size_t>(dst)] = g.lse_rows[static_cast<std::size_t>(r * sh.h + hh)];
    }
  write_f32("--out-dir", out_dir + "/prefill_lse.npy",
            sh.varlen ? std::vector<std::int64_t>{sh.h, total}
                      : std::vector<std::int64_t>{sh.b, sh.h, s0},
            t.data());
  if (sh.steps > 0) {
    write_f32("--out-dir", out_dir + "/decode_out.npy", {sh.steps, sh.b, sh.t, sh.h, sh.d_v},
              res.d_out.data());
    write_f32("--out-dir", out_dir + "/decode_lse.npy", {sh.steps, sh.b, sh.h, sh.t},
              res.d_lse.data());
  }
  if (sh.s1 > 0) {
    write_f32("--out-dir", out_dir + "/extend_out.npy", {sh.b, sh.s1, sh.h, sh.d_v},
              res.e_out.data());
    write_f32("--out-dir", out_dir + "/extend_lse.npy", {sh.b, sh.h, sh.s1}, res.e_lse.data());
  }
}

// Everything the result line / JSON object shows.
struct SessionReport {
  const SessionArgs& a;
  const SessionSetup& st;
  const Engine& engine;
  const SessionResults& res;
  const CheckErrors& err;
  double prefill_bytes;  // max over the ranks
  double step_median() const { return median_of(res.step_s); }
  double decode_tokens_per_s() const {
    const double m = step_median();
    return m > 0 ? double(st.sh.b) * st.sh.t / m : 0.0;
  }
};

void print_json(const SessionReport& r) {
  const Shape& sh = r.st.sh;
  const SessionResults& res = r.res;
  Json j = result_json("session", r.st.ranks, r.engine);
  j["dtype"] = dtype_name(r.st.dtype);
  j["batch"] = sh.b;
  j["prompt_max"] = sh.prompt_max();
  write_json(j, HeadArgs{sh.h, sh.h_k, sh.d, sh.d_v});
  j["page_size"] = r.a.page_size;
  j["cache_layout"] = cache_layout_name(r.st.cache_layout);
  j["prefill_layout"] = layout_name(r.st.prefill_layout);
  j["time_s"] = json_number(res.session_s);
  j["ttft_s"] = json_number(res.pst.total_s);
  j["prefill_attention"] = !r.a.skip_prefill;
  j["prefill_bytes_per_rank"] = json_number(r.prefill_bytes);
  j["decode_steps"] = sh.steps;
  j["decode_tokens_per_step"] = sh.t;
  j["decode_step_median_s"] = json_number(r.step_median());
  j["decode_step_p99_s"] = json_number(percentile(res.step_s, 0.99));
  // decode_merge_share: the reduction's own cost (StepStats::merge_s); the time ranks
  // wait in it for the slowest rank is decode_imbalance_share (mean over ranks) and
  // decode_max_wait_share (the fastest rank); decode_reduction_share is the slowest
  // rank's whole time inside the reduction (merge + wait, the measure before the split).
  res.to_json(j);
  j["decode_merge_after_barrier"] = r.a.merge_after_barrier;
  Json per_rank = Json::array();
  for (double x : res.local_sum) per_rank.push_back(json_number(x / std::max(1, sh.steps)));
  j["decode_local_mean_s_per_rank"] = per_rank;
  j["decode_tokens_per_s"] = json_number(r.decode_tokens_per_s());
  j["decode_bytes_per_rank"] = json_number(res.decode_bytes);
  j["extend_len"] = sh.s1;
  if (sh.s1 > 0) {
    j["extend_s"] = json_number(res.est.total_s);
    j["extend_mode"] = extend_mode_name(res.plan.mode);
    j["extend_why"] = res.plan.why;
    j["extend_bytes_per_rank"] = json_number(res.est.bytes);
  }
  if (r.a.check) r.err.to_json(j);
  std::printf("%s\n", json_dump(j).c_str());
}

void print_line(const SessionReport& r) {
  const Shape& sh = r.st.sh;
  const SessionResults& res = r.res;
  std::printf(
      "session: ranks=%d threads=%d backend=%s dtype=%s b=%d prompt=%lld h=%d h_k=%d d=%d "
      "d_v=%d page=%d cache=%s | ttft %.4f s | decode %d x %d tok: step median %.3f ms, "
      "p99 %.3f ms, merge %.2f%%, imbalance wait %.1f%% (max %.1f%%), in reduction %.1f%%, "
      "%.1f tok/s",
      r.st.ranks, r.engine.threads(), r.engine.backend_name().c_str(), dtype_name(r.st.dtype), sh.b,
      static_cast<long long>(sh.prompt_max()), sh.h, sh.h_k, sh.d, sh.d_v, r.a.page_size,
      cache_layout_name(r.st.cache_layout), res.pst.total_s, sh.steps, sh.t, r.step_median() * 1e3,
      percentile(res.step_s, 0.99) * 1e3, median_of(res.merge_share) * 100.0,
      median_of(res.imbalance_share) * 100.0, median_of(res.max_wait_share) * 100.0,
      median_of(res.reduction_share) * 100.0, r.decode_tokens_per_s());
  if (sh.s1 > 0)
    std::printf(" | extend %d tok: %.4f s %s (%s)", sh.s1, res.est.total_s,
                extend_mode_name(res.plan.mode), res.plan.why.c_str());
  if (r.a.check) r.err.print();
  std::printf("\n");
}

// --mla: the MLA session's options (its cache holds the synthetic shape's tokens).
MlaSessionRun mla_run(const SessionArgs& a, const SessionSetup& st, const SessionConfig& cfg) {
  MlaSessionRun r;
  r.b = st.sh.b;
  r.h_q = st.sh.h;
  r.steps = st.sh.steps;
  r.t = st.sh.t;
  r.prompt = st.sh.prompt_max();
  r.dtype = st.dtype;
  r.seed = a.seed;
  r.page_size = a.page_size;
  r.layout = st.cache_layout;
  r.prompt_layout = st.prefill_layout;
  r.scale = st.mask.scale;
  r.sinks = cfg.mask.sinks;
  r.root = a.reduce_to_root ? 0 : -1;
  r.merge_barrier = a.merge_after_barrier;
  r.check = a.check;
  r.json = a.json;
  return r;
}

}  // namespace

int cmd_session(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  SessionArgs a;
  if (!parse_args_mpi(comm, argc, argv, options(a), kUsage, &a.vm)) return 0;
  SessionSetup st;
  st.files = a.files();
  st.ranks = comm.size();
  st.rank = comm.rank();
  comm::run_collectively(comm, [&] { parse_and_load(a, st); });
  if (st.files) broadcast_inputs(comm, st);
  const SessionConfig cfg = session_config(comm, a, st);
  const Engine engine = make_engine_mpi(comm, a.kernel);
  if (a.mla) return run_mla_session(comm, engine, mla_run(a, st, cfg));
  KvSession session(comm, engine, cfg);
  session.set_merge_after_barrier(a.merge_after_barrier);

  SessionResults res;
  prefill(comm, engine, session, a, st, res);  // starts the session's clock
  decode_steps(comm, session, a, st, res);
  extend(session, a, st, res);
  res.session_s = allreduce_max(comm, now_seconds() - res.t_start);

  const CheckErrors err = a.check ? check(comm, a, st, cfg, res) : CheckErrors{};
  const bool write = st.files && !a.out_dir.empty();
  const GatheredPrefill g = write ? gather_prefill(comm, st, res) : GatheredPrefill{};
  const double prefill_bytes = allreduce_max(comm, res.pst.bytes);
  if (st.rank == 0) {
    if (write) write_outputs(a.out_dir, st.sh, g, res);
    const SessionReport report{a, st, engine, res, err, prefill_bytes};
    if (a.json) {
      print_json(report);
    } else {
      print_line(report);
    }
    std::fflush(stdout);
  }
  return a.check && err.failed(st.dtype, "session", st.rank == 0) ? 1 : 0;
}

}  // namespace ringattn::cli
