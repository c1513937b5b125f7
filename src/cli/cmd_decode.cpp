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

#include "cli/args.hpp"
#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {
constexpr const char* kUsage =
    "usage: mpirun -np N ringattn decode (--q Q.npy --k-cache K.npy --v-cache V.npy [--out O.npy]\n"
    "                                    [--lse L.npy] | --seqlen S [--batch B] ...) [options]\n"
    "\n"
    "Distributed decode: the KV cache is split across ranks, partial results are merged\n"
    "by an MPI reduction whose operation is the LSE merge.";

// The options of `ringattn decode`, each declared once (cli/args.hpp).
struct DecodeArgs : MpiCommandArgs {
  // files mode
  std::string q, k_cache, v_cache, out, lse;
  // synthetic mode
  int batch = 1;
  std::int64_t seqlen = 0;
  int q_len = 1;
  HeadArgs heads;
  std::uint64_t seed = 0;
  // run
  int iters = 1;
  bool check = false;
  bool json = false;

  template <class V>
  void for_each(V& f) {
    f.group("Files mode (read/written on rank 0)");
    f(q, {"q", "queries [b, s_q, h, d]", kNoDefault});
    f(k_cache, {"k-cache", "key cache [b, S, h_k, d]", kNoDefault});
    f(v_cache, {"v-cache", "value cache [b, S, h_k, d_v]", kNoDefault});
    f(out, {"out", "output fp32 [b, s_q, h, d_v]", kNoDefault});
    f(lse, {"lse", "LSE fp32 [b, h, s_q]", kNoDefault});
    f.group("Synthetic mode");
    f(batch, kBatchFlag);
    f(seqlen, {"seqlen", "cache length S per sequence"});
    f(q_len, {"q-len", "new query rows s_q per sequence"});
    heads.for_each(f);
    f(seed, kSeedFlag);
    f.group("Run");
    f(iters, kItersFlag);
    f(check, {"check", "verify every row against a float64 computation"});
    f(json, kJsonFlag);
    mask_and_kernel(f, "Mask");
  }
  bool files() const { return given(vm, "q") || given(vm, "k-cache") || given(vm, "v-cache"); }
};

// The problem: b sequences of s_q new query rows against a cache of s tokens each.
struct DecodeShape {
  int b = 1, s_q = 1, h = 8, h_k = 0, d = 128, d_v = 0;
  std::int64_t s = 0;
  std::int64_t k_row() const { return std::int64_t{h_k} * d; }
  std::int64_t v_row() const { return std::int64_t{h_k} * d_v; }
};

// The parsed options, the inputs (rank 0, files mode) and the output files.
struct DecodeSetup {
  bool files = false;
  int ranks = 1, rank = 0;
  DecodeShape sh;
  DecodeParams p;  // dtype and mask; the shape and pointers are set by decode_params
  std::vector<float> sinks;
  std::unique_ptr<Engine> engine;
  StoredTensor q_all, k_all, v_all;
  std::optional<OutputTensor> out_file, lse_file;  // rank 0, files mode (until distribute)
};

// This rank's inputs: the whole query and its contiguous slice of every cache.
struct DecodeBuffers {
  std::unique_ptr<std::byte[]> q, k_cache, v_cache;
};

// Rank 0, files mode: headers checked first, output files created, then the data read.
void load_files(const DecodeArgs& a, DecodeSetup& st) {
  DecodeShape& sh = st.sh;
  const NpyFile q_file = open_tensor("--q", a.q, 4);
  const NpyFile k_file = open_tensor("--k-cache", a.k_cache, 4);
  const NpyFile v_file = open_tensor("--v-cache", a.v_cache, 4);
  const NpyHeader &q = q_file.header(), &k = k_file.header(), &v = v_file.header();
  check_dim("--k-cache", k, 0, "--q", q, 0, "batch");
  check_dim("--v-cache", v, 0, "--q", q, 0, "batch");
  check_dim("--v-cache", v, 1, "--k-cache", k, 1, "cache length");
  check_dim("--v-cache", v, 2, "--k-cache", k, 2, "kv heads");
  check_dim("--k-cache", k, 3, "--q", q, 3, "head dim");
  sh.b = static_cast<int>(q.shape[0]);
  sh.s_q = static_cast<int>(q.shape[1]);
  sh.h = static_cast<int>(q.shape[2]);
  sh.d = static_cast<int>(q.shape[3]);
  sh.s = k.shape[1];
  sh.h_k = static_cast<int>(k.shape[2]);
  sh.d_v = static_cast<int>(v.shape[3]);
  // Output files are created before anything is computed (a bad path fails at once).
  if (!a.out.empty())
    st.out_file.emplace("--out", a.out, std::vector<std::int64_t>{sh.b, sh.s_q, sh.h, sh.d_v});
  if (!a.lse.empty())
    st.lse_file.emplace("--lse", a.lse, std::vector<std::int64_t>{sh.b, sh.h, sh.s_q});
  st.q_all = load_storage("--q", q_file, st.p.dtype);
  st.k_all = load_storage("--k-cache", k_file, st.p.dtype);
  st.v_all = load_storage("--v-cache", v_file, st.p.dtype);
}

// Checks the options and reads (rank 0) or makes up the problem; every error is agreed
// by all ranks. Files mode: rank 0 then tells the others the shape.
void set_up(const comm::Communicator& comm, const DecodeArgs& a, DecodeSetup& st) {
  st.files = a.files();
  st.ranks = comm.size();
  st.rank = comm.rank();
  comm::run_collectively(comm, [&] {
    const int iters = a.iters;  // named by the check
    st.p.dtype = tensor_dtype(a.kernel);
    st.p.mask = to_mask_params(a.mask);
    st.engine = std::make_unique<Engine>(make_engine(a.kernel));
    RA_CHECK_ARG_GE(iters, 1, "--iters");
    if (!st.files) {
      const std::int64_t s = a.seqlen;
      RA_CHECK_ARG_GT(s, 0, "--seqlen (or --q/--k-cache/--v-cache files) is required");
      HeadArgs heads = a.heads;
      heads.resolve();
      st.sh = {a.batch, a.q_len, heads.heads, heads.kv_heads, heads.dim, heads.dim_v, s};
      return;
    }
    require(a.vm, "q");
    require(a.vm, "k-cache");
    require(a.vm, "v-cache");
    if (st.rank == 0) load_files(a, st);
  });
  if (st.files) {
    DecodeShape& sh = st.sh;
    std::int64_t hdr[7] = {sh.b, sh.s_q, sh.h, sh.h_k, sh.d, sh.d_v, sh.s};
    RA_MPI_CHECK(MPI_Bcast(hdr, 7, MPI_INT64_T, 0, comm.get()));
    sh = {static_cast<int>(hdr[0]),
          static_cast<int>(hdr[1]),
          static_cast<int>(hdr[2]),
          static_cast<int>(hdr[3]),
          static_cast<int>(hdr[4]),
          static_cast<int>(hdr[5]),
          hdr[6]};
  }
  // Every rank reads --sinks itself (the decode checks that all ranks pass the same).
  comm::run_collectively(comm, [&] { st.sinks = load_sinks(a.mask, st.sh.h); });
  if (!st.sinks.empty()) st.p.mask.sinks = st.sinks.data();
}

// The query broadcast and the caches scattered from rank 0 (files mode), or generated
// (synthetic); every element is filled, so the buffers are not zeroed first.
DecodeBuffers distribute(const comm::Communicator& comm, const DecodeArgs& a,
                         const DecodeSetup& st) {
  const DecodeShape& sh = st.sh;
  const int P = st.ranks;
  const std::size_t es = dtype_size(st.p.dtype);
  const std::int64_t s = sh.s, n = s >= P ? decode_shard_length(s, P, st.rank) : 0;
  const std::int64_t k0 = s >= P ? decode_shard_first(s, P, st.rank) : 0;
  const std::int64_t qn = std::int64_t{sh.b} * sh.s_q * sh.h * sh.d, kr = sh.k_row(),
                     vr = sh.v_row();
  const std::size_t q_bytes = static_cast<std::size_t>(qn) * es;
  const auto buffer = [](std::size_t bytes) {
    return std::unique_ptr<std::byte[]>(new std::byte[std::max<std::size_t>(bytes, 1)]);
  };
  DecodeBuffers buf{buffer(q_bytes), buffer(static_cast<std::size_t>(sh.b * n * kr) * es),
                    buffer(static_cast<std::size_t>(sh.b * n * vr) * es)};
  const auto spans_of = [&](int r) {
    comm::RowSpans sp;
    if (s < P) return sp;
    for (int i = 0; i < sh.b; ++i)
      sp.push_back({i * s + decode_shard_first(s, P, r), decode_shard_length(s, P, r), 1});
    return sp;
  };
  if (st.files) {
    if (st.rank == 0 && q_bytes > 0) std::memcpy(buf.q.get(), st.q_all.data(), q_bytes);
    comm::broadcast_bytes(comm, 0, buf.q.get(), q_bytes);
    comm::scatter_rows(comm, 0, st.k_all.data(), static_cast<std::size_t>(kr) * es, spans_of,
                       buf.k_cache.get());
    comm::scatter_rows(comm, 0, st.v_all.data(), static_cast<std::size_t>(vr) * es, spans_of,
                       buf.v_cache.get());
    return buf;
  }
  fill_synthetic(a.seed, 0, 0, qn, st.p.dtype, buf.q.get());
  for (int i = 0; i < sh.b; ++i) {
    fill_synthetic(a.seed, 1, (i * s + k0) * kr, n * kr, st.p.dtype,
                   buf.k_cache.get() + static_cast<std::size_t>(i * n * kr) * es);
    fill_synthetic(a.seed, 2, (i * s + k0) * vr, n * vr, st.p.dtype,
                   buf.v_cache.get() + static_cast<std::size_t>(i * n * vr) * es);
  }
  return buf;
}

// The decode's params; rank 0 (files mode) writes into the output files, the others
// into uninitialised buffers.
DecodeParams decode_params(DecodeSetup& st, const DecodeBuffers& buf) {
  const DecodeShape& sh = st.sh;
  if (!st.out_file)
    st.out_file.emplace("--out", "", std::vector<std::int64_t>{sh.b, sh.s_q, sh.h, sh.d_v});
  if (!st.lse_file) st.lse_file.emplace("--lse", "", std::vector<std::int64_t>{sh.b, sh.h, sh.s_q});
  DecodeParams p = st.p;
  p.b = sh.b;
  p.s_q = sh.s_q;
  p.h = sh.h;
  p.h_k = sh.h_k;
  p.d = sh.d;
  p.d_v = sh.d_v;
  p.s_cache = sh.s;
  p.root = 0;
  p.q = buf.q.get();
  p.k_cache = buf.k_cache.get();
  p.v_cache = buf.v_cache.get();
  p.out = st.out_file->data();
  p.lse = st.lse_file->data();
  return p;
}

// --iters timed runs; the median of the slowest rank's time.
double run_timed(const comm::Communicator& comm, const Engine& engine, const DecodeParams& p,
                 int iters) {
  std::vector<double> times;
  for (int it = 0; it < iters; ++it) {
    comm.barrier();
    const double t0 = now_seconds();
    distributed_decode(comm, engine, p);
    times.push_back(allreduce_max(comm, now_seconds() - t0));
  }
  return median_of(times);
}

// Rank 0, --check: every row against float64 (from the files or the synthetic values).
CheckErrors check(const DecodeArgs& a, const DecodeSetup& st, const DecodeParams& p) {
  const DecodeShape& sh = st.sh;
  const std::int64_t kr = sh.k_row(), vr = sh.v_row(), s = sh.s;
  const auto val = [&](int tensor, const StoredTensor& t, std::int64_t idx) {
    return st.files ? double(load_as_f32(t.data(), idx, p.dtype))
                    : double(synthetic_value(a.seed, tensor, idx, p.dtype));
  };
  CheckErrors err;
  std::vector<double> ro(static_cast<std::size_t>(sh.h * sh.d_v)),
      rl(static_cast<std::size_t>(sh.h));
  for (int bi = 0; bi < sh.b; ++bi)
    for (int i = 0; i < sh.s_q; ++i) {
      RowRefProblem rp{sh.h, sh.h_k, sh.d, sh.d_v, s, i, s - sh.s_q, p.mask};
      const std::int64_t row = std::int64_t{bi} * sh.s_q + i, qb = row * sh.h * sh.d;
      reference_row(
          rp, [&](int hh, int c) { return val(0, st.q_all, qb + hh * sh.d + c); },
          [&](std::int64_t j, int kh, int c) {
            return val(1, st.k_all, (bi * s + j) * kr + kh * sh.d + c);
          },
          [&](std::int64_t j, int kh, int c) {
            return val(2, st.v_all, (bi * s + j) * vr + kh * sh.d_v + c);
          },
          ro.data(), rl.data());
      err.add_row(p.out + row * sh.h * sh.d_v, p.lse + std::int64_t{bi} * sh.h * sh.s_q + i, sh.s_q,
                  ro, rl);
    }
  return err;
}

void print_result(const DecodeArgs& a, const DecodeSetup& st, double t_med,
                  const CheckErrors& err) {
  const DecodeShape& sh = st.sh;
  const Engine& engine = *st.engine;
  // Cache bytes the query rows reach (positions s - s_q .. s - 1): all of it, or from the
  // left window's / attention chunk's first key on (the decode reads no other key).
  const std::int64_t s = sh.s;
  std::int64_t first_key = 0;
  if (st.p.mask.window_left >= 0)
    first_key = std::max<std::int64_t>(0, s - sh.s_q - st.p.mask.window_left);
  if (st.p.mask.attention_chunk > 0)
    first_key = std::max<std::int64_t>(first_key, std::max<std::int64_t>(0, s - sh.s_q) /
                                                      st.p.mask.attention_chunk *
                                                      st.p.mask.attention_chunk);
  const double bytes = static_cast<double>(sh.b) * static_cast<double>(s - first_key) *
                       (sh.k_row() + sh.v_row()) * static_cast<double>(dtype_size(st.p.dtype));
  if (a.json) {
    Json j = result_json("decode", st.ranks, engine);
    j["dtype"] = dtype_name(st.p.dtype);
    j["batch"] = sh.b;
    j["q_len"] = sh.s_q;
    j["cache_len"] = sh.s;
    write_json(j, HeadArgs{sh.h, sh.h_k, sh.d, sh.d_v});
    j["iters"] = a.iters;
    j["time_s"] = json_number(t_med);
    j["cache_gbps"] = json_number(bytes / t_med / 1e9);
    if (a.check) err.to_json(j);
    std::printf("%s\n", json_dump(j).c_str());
    return;
  }
  std::printf(
      "decode: ranks=%d threads=%d backend=%s dtype=%s b=%d q_len=%d cache=%lld h=%d h_k=%d "
      "d=%d d_v=%d | time %.4f s (median of %d) %.2f GB/s of cache",
      st.ranks, engine.threads(), engine.backend_name().c_str(), dtype_name(st.p.dtype), sh.b,
      sh.s_q, static_cast<long long>(sh.s), sh.h, sh.h_k, sh.d, sh.d_v, t_med, a.iters,
      bytes / t_med / 1e9);
  if (a.check) err.print();
  std::printf("\n");
}

}  // namespace

int cmd_decode(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  DecodeArgs a;
  if (!parse_args_mpi(comm, argc, argv, options(a), kUsage, &a.vm)) return 0;
  DecodeSetup st;
  set_up(comm, a, st);
  const DecodeBuffers buf = distribute(comm, a, st);
  const DecodeParams p = decode_params(st, buf);
  const double t_med = run_timed(comm, *st.engine, p, a.iters);
  if (st.rank != 0) return 0;
  const CheckErrors err = a.check ? check(a, st, p) : CheckErrors{};
  st.out_file->commit();
  st.lse_file->commit();
  print_result(a, st, t_med, err);
  return a.check && err.failed(p.dtype, "decode", true) ? 1 : 0;
}

}  // namespace ringattn::cli
