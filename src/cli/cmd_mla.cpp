// `ringattn mla`: DeepSeek MLA decode (absorbed form) on a paged latent cache,
// dense or sparse (docs/cli.md, docs/semantics.md section 4).
//
//   --q             [b, s_q, h, 576]  <f4/<f2 (stored as --dtype fp32|bf16)
//   --kv-cache      [blocks, page, 576] real values <f4/<f2, stored as --kv-dtype:
//                   fp32 / bf16 (rounded), or fp8 e4m3 holding value / --kv-scale
//                   (FlashInfer: bmm1_scale = scale * kv_scale, bmm2_scale = kv_scale)
//   --block-table   [b, max_blocks] int32/int64; --cache-seqlens [b]
//   --indices       [b, s_q, topk] global slots (block * page + offset), -1 = pad
//   --out           fp32 [b, s_q, h, 512]; --lse fp32 [b, h, s_q] (natural log)
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "cli/args.hpp"
#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "cli/ring_common.hpp"
#include "ringattn/comm/collectives.hpp"
#include "ringattn/comm/communicator.hpp"
#include "ringattn/comm/mpi_check.hpp"
#include "ringattn/distributed_decode.hpp"
#include "ringattn/error.hpp"
#include "ringattn/mla_distributed_decode.hpp"
#include "ringattn/mla_params.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: ringattn mla --q Q.npy --kv-cache C.npy --block-table T.npy --cache-seqlens L.npy\n"
    "                    [--indices I.npy] [--causal] [--scale S] [--kv-dtype fp32|bf16|fp8]\n"
    "                    [--kv-scale K] --out O.npy [--lse LSE.npy]\n\n"
    "DeepSeek MLA decode: q [b, s_q, h, 576] against a paged latent cache [blocks, page, 576]\n"
    "(V = the first 512 values). With --indices [b, s_q, topk] each query token attends only\n"
    "to its listed global slots (block * page + offset; -1 = padding). --kv-dtype fp8 stores\n"
    "cache value / --kv-scale as e4m3 (the file holds real values). Under mpirun -np P\n"
    "(P > 1) the latent cache is sharded across the ranks (rank r holds tokens\n"
    "[r L / P, (r + 1) L / P) of each sequence) and the partial results are merged on rank 0:\n"
    "the same output as one process.";

// Everything one process needs for the decode: the params and what they point into.
struct LoadedMla {
  MlaDecodeParams p;
  Engine engine;
  bool sparse = false;
  DType kv_dtype = DType::kF32;
  std::vector<std::int32_t> table, lens, indices;
  std::optional<OutputTensor> out, lse;
  std::optional<StoredTensor> q_store, cache_store;
};

// The options of `ringattn mla`, each declared once (cli/args.hpp). --causal and
// --scale mean here what they mean for MLA (DeepSeek's scale, no windows), so they are
// declared here rather than taken from MaskArgs.
struct MlaArgs {
  std::string q, kv_cache, block_table, cache_seqlens, indices, out, lse;
  bool causal = false;
  float scale = 0.0f;
  std::string kv_dtype = "fp32";
  float kv_scale = 0.0f;
  int num_splits = 0;
  KernelArgs kernel;
  po::variables_map vm;  // what the command line gave

  template <class V>
  void for_each(V& f) {
    f.group("MLA");
    f(q, {"q", "query [b, s_q, h, 576] .npy", kNoDefault});
    f(kv_cache, {"kv-cache", "latent cache [blocks, page, 576] .npy (real values)", kNoDefault});
    f(block_table,
      {"block-table", "block table [b, max_blocks] int32/int64 (dense decode)", kNoDefault});
    f(cache_seqlens,
      {"cache-seqlens", "tokens cached per sequence [b] int32/int64 (dense decode)", kNoDefault});
    f(indices, {"indices", "sparse MLA: global slots [b, s_q, topk], -1 = padding", kNoDefault});
    f(causal, {"causal", "bottom-right causal over the s_q query tokens (dense decode)"});
    f(scale, {"scale", "softmax scale; 0 = 1/sqrt(576) (DeepSeek uses 1/sqrt(192))"});
    f(kv_dtype, {"kv-dtype", "cache storage: fp32, bf16 or fp8 (e4m3, needs --kv-scale)"});
    f(kv_scale, {"kv-scale", "fp8 only: the cache stores value / kv_scale"});
    f(num_splits, {"num-splits", "key splits per sequence: 0 = engine plan, 1 = none"});
    f(out, {"out", "output fp32 [b, s_q, h, 512] .npy", kNoDefault});
    f(lse, {"lse", "log-sum-exp fp32 [b, h, s_q] .npy", kNoDefault});
    f.group("Kernel");
    kernel.for_each(f);
  }
};

// --kv-dtype, --scale and --kv-scale checked; the cache's storage dtype.
DType check_scales(const MlaArgs& a) {
  const DType kv_dtype = parse_dtype(a.kv_dtype, "--kv-dtype");
  RA_CHECK_ARG(kv_dtype == DType::kF32 || kv_dtype == DType::kBF16 || kv_dtype == DType::kFP8E4M3,
               "--kv-dtype: expected fp32, bf16 or fp8, got '" << a.kv_dtype << "'");
  RA_CHECK_ARG(std::isfinite(a.scale) && a.scale >= 0.0f, "--scale: must be >= 0, got " << a.scale);
  if (kv_dtype == DType::kFP8E4M3) {
    RA_CHECK_ARG(std::isfinite(a.kv_scale) && a.kv_scale > 0.0f,
                 "--kv-scale: fp8 cache needs its scale (> 0), got " << a.kv_scale);
  } else {
    RA_CHECK_ARG(a.kv_scale == 0.0f,
                 "--kv-scale: only used with --kv-dtype fp8, got --kv-dtype " << a.kv_dtype);
  }
  return kv_dtype;
}

// The params that the headers of --q [b, s_q, h, 576] and --kv-cache [blocks, page, 576]
// and the scalar options give.
void header_params(const MlaArgs& a, const NpyHeader& q, const NpyHeader& cache, DType q_dtype,
                   DType kv_dtype, MlaDecodeParams& p) {
  RA_CHECK_ARG(q.shape[3] == kMlaHeadDim, "--q: last dim must be 576 (512 latent + 64 rope), got "
                                              << q.shape[3] << " (shape "
                                              << shape_to_string(q.shape) << ")");
  RA_CHECK_ARG(cache.shape[2] == kMlaHeadDim,
               "--kv-cache: last dim must be 576 (512 latent + 64 rope), got "
                   << cache.shape[2] << " (shape " << shape_to_string(cache.shape) << ")");
  p.q_dtype = q_dtype;
  p.kv_dtype = kv_dtype;
  p.out_dtype = DType::kF32;
  p.b = static_cast<int>(q.shape[0]);
  p.s_q = static_cast<int>(q.shape[1]);
  p.h_q = static_cast<int>(q.shape[2]);
  p.num_blocks = static_cast<int>(cache.shape[0]);
  p.page_size = static_cast<int>(cache.shape[1]);
  p.causal = a.causal;
  p.num_splits = a.num_splits;
  if (kv_dtype == DType::kFP8E4M3) {
    const float sm = a.scale > 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(kMlaHeadDim));
    p.bmm1_scale = sm * a.kv_scale;
    p.bmm2_scale = a.kv_scale;
  } else {
    p.scale = a.scale;
  }
}

// --block-table, --cache-seqlens and (sparse) --indices, checked against b and s_q.
void load_index_inputs(const MlaArgs& a, LoadedMla& m) {
  MlaDecodeParams& p = m.p;
  const std::int64_t b = p.b, s_q = p.s_q;
  if (given(a.vm, "block-table")) {
    const NpyArray t = load_npy_arg("--block-table", a.block_table);
    RA_CHECK_ARG(t.is_index() && t.ndim() == 2 && t.shape[0] == b,
                 "--block-table: expected int32/int64 [b = " << b << ", max_blocks], got shape "
                                                             << shape_to_string(t.shape));
    m.table = t.to_i32("--block-table");
    p.max_blocks = static_cast<int>(t.shape[1]);
    p.block_table = m.table.data();
  }
  if (given(a.vm, "cache-seqlens")) {
    m.lens = load_index("--cache-seqlens", a.cache_seqlens, {b});
    p.cache_seqlens = m.lens.data();
  }
  if (m.sparse) {
    const NpyArray t = load_npy_arg("--indices", a.indices);
    RA_CHECK_ARG(t.is_index() && t.ndim() == 3 && t.shape[0] == b && t.shape[1] == s_q,
                 "--indices: expected int32/int64 [b = " << b << ", s_q = " << s_q
                                                         << ", topk], got shape "
                                                         << shape_to_string(t.shape));
    m.indices = t.to_i32("--indices");
    p.indices = m.indices.data();
    p.topk = static_cast<int>(t.shape[2]);
  }
}

// Checks the options, reads the inputs and creates the output files (before anything
// is computed).
void load_mla(const MlaArgs& a, LoadedMla& m) {
  m.sparse = given(a.vm, "indices");
  if (!m.sparse) {
    require(a.vm, "block-table");
    require(a.vm, "cache-seqlens");
  }
  const DType kv_dtype = m.kv_dtype = check_scales(a);
  const DType q_dtype = tensor_dtype(a.kernel);
  m.engine = make_engine(a.kernel);

  // Headers first: every shape is checked before any data is read.
  const NpyFile q_file = open_tensor("--q", a.q, 4);
  const NpyFile cache_file = open_tensor("--kv-cache", a.kv_cache, 3);
  header_params(a, q_file.header(), cache_file.header(), q_dtype, kv_dtype, m.p);
  load_index_inputs(a, m);

  // Output files are created before anything is computed (a bad path fails at once);
  // the kernel writes into them directly (it writes every element).
  MlaDecodeParams& p = m.p;
  const std::int64_t b = p.b, s_q = p.s_q, h = p.h_q;
  m.out.emplace("--out", a.out, std::vector<std::int64_t>{b, s_q, h, kMlaValueDim});
  if (!a.lse.empty()) m.lse.emplace("--lse", a.lse, std::vector<std::int64_t>{b, h, s_q});
  // Inputs in storage dtype: the files themselves when they hold it (mapped); an fp8
  // cache holds value / kv_scale.
  m.q_store.emplace(load_storage("--q", q_file, q_dtype));
  m.cache_store.emplace(load_storage("--kv-cache", cache_file, kv_dtype, false,
                                     kv_dtype == DType::kFP8E4M3 ? a.kv_scale : 1.0f));
  p.q = m.q_store->data();
  p.kv_cache = m.cache_store->data();
  p.out = m.out->data();
  p.lse = m.lse ? m.lse->data() : nullptr;
}

void print_result(const LoadedMla& m, int ranks, double seconds) {
  std::printf("mla: ranks=%d b=%d s_q=%d h=%d %s kv=%s backend=%s time %.3f ms\n", ranks, m.p.b,
              m.p.s_q, m.p.h_q, m.sparse ? "sparse" : (m.p.causal ? "causal" : "dense"),
              dtype_name(m.kv_dtype), m.engine.backend_name().c_str(), seconds * 1e3);
}

// One process: the decode on the whole cache.
int run_single(const MlaArgs& a) {
  LoadedMla m;
  load_mla(a, m);
  const double t0 = now_seconds();
  m.engine.mla_decode(m.p);
  const double dt = now_seconds() - t0;
  m.out->commit();
  if (m.lse) m.lse->commit();
  print_result(m, 1, dt);
  return 0;
}

// What every rank needs to know of rank 0's problem.
struct MlaHeader {
  std::int64_t b = 0, s_q = 0, h = 0, page = 0, token_bytes = 0, q_bytes = 0, causal = 0;
  float scale = 0, bmm1_scale = 0, bmm2_scale = 0;
  int q_dtype = 0, kv_dtype = 0, num_splits = 0;
};

// P > 1, collective: rank 0 loads everything; the header, the sequence lengths and the
// query reach every rank.
MlaHeader share_problem(const comm::Communicator& comm, const MlaArgs& a, LoadedMla& m,
                        std::vector<std::int32_t>& global, std::vector<std::byte>& q_local) {
  std::int64_t hdr[7] = {0, 0, 0, 0, 0, 0, 0};  // b, s_q, h, page, token bytes, q bytes, causal
  comm::run_collectively(comm, [&] {
    m.engine = make_engine(a.kernel);
    if (comm.rank() != 0) return;
    load_mla(a, m);
    RA_CHECK(
        !m.sparse, UnsupportedError,
        "--indices: sparse MLA decode runs on one rank only (got " << comm.size() << " ranks)");
    hdr[0] = m.p.b;
    hdr[1] = m.p.s_q;
    hdr[2] = m.p.h_q;
    hdr[3] = m.p.page_size;
    hdr[4] = static_cast<std::int64_t>(kMlaHeadDim * dtype_size(m.p.kv_dtype));
    hdr[5] = static_cast<std::int64_t>(m.q_store->bytes());
    hdr[6] = m.p.causal;
  });
  RA_MPI_CHECK(MPI_Bcast(hdr, 7, MPI_INT64_T, 0, comm.get()));
  MlaHeader h{hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6]};
  global.resize(static_cast<std::size_t>(h.b));
  if (comm.rank() == 0) global = m.lens;
  RA_MPI_CHECK(MPI_Bcast(global.data(), static_cast<int>(h.b), MPI_INT32_T, 0, comm.get()));
  q_local.resize(static_cast<std::size_t>(h.q_bytes));
  if (comm.rank() == 0) std::memcpy(q_local.data(), m.q_store->data(), q_local.size());
  comm::broadcast_bytes(comm, 0, q_local.data(), q_local.size());
  float bmm[3] = {m.p.scale, m.p.bmm1_scale, m.p.bmm2_scale};
  int kinds[3] = {static_cast<int>(m.p.q_dtype), static_cast<int>(m.p.kv_dtype), m.p.num_splits};
  RA_MPI_CHECK(MPI_Bcast(bmm, 3, MPI_FLOAT, 0, comm.get()));
  RA_MPI_CHECK(MPI_Bcast(kinds, 3, MPI_INT, 0, comm.get()));
  h.scale = bmm[0];
  h.bmm1_scale = bmm[1];
  h.bmm2_scale = bmm[2];
  h.q_dtype = kinds[0];
  h.kv_dtype = kinds[1];
  h.num_splits = kinds[2];
  return h;
}

// Rank r's slice of every sequence: tokens per sequence and pages per sequence.
struct Slice {
  std::vector<std::int32_t> n;
  int max_blocks = 1;
};
Slice slice_of(const std::vector<std::int32_t>& global, int ranks, int r, int page) {
  Slice s;
  s.n.resize(global.size());
  for (std::size_t i = 0; i < global.size(); ++i) {
    s.n[i] = static_cast<std::int32_t>(decode_shard_length(global[i], ranks, r));
    s.max_blocks = std::max(s.max_blocks, (s.n[i] + page - 1) / page);
  }
  return s;
}

// Rank 0 cuts each sequence's tokens [r L / P, (r + 1) L / P) into rank r's own paged
// cache (pages of the same size, identity block table) and sends it, in messages of at
// most 1 GiB; returns this rank's cache.
std::vector<std::byte> distribute_cache(const comm::Communicator& comm, const LoadedMla& m,
                                        const MlaHeader& h, const std::vector<std::int32_t>& global,
                                        const Slice& mine) {
  const int P = comm.size(), page = static_cast<int>(h.page);
  const auto token_bytes = static_cast<std::size_t>(h.token_bytes);
  const std::size_t b = global.size(), kChunk = std::size_t{1} << 30;
  if (comm.rank() != 0) {
    std::vector<std::byte> cache(b * mine.max_blocks * page * token_bytes);
    for (std::size_t off = 0; off < cache.size(); off += kChunk) {
      const auto n_bytes = std::min(cache.size() - off, kChunk);
      RA_MPI_CHECK(MPI_Recv(cache.data() + off, static_cast<int>(n_bytes), MPI_BYTE, 0, 7,
                            comm.get(), MPI_STATUS_IGNORE));
    }
    return cache;
  }
  const auto* src = static_cast<const std::byte*>(m.p.kv_cache);
  for (int r = P - 1; r >= 0; --r) {  // rank 0's own slice last: it is the buffer kept
    const Slice sl = slice_of(global, P, r, page);
    const std::size_t mb = static_cast<std::size_t>(sl.max_blocks);
    std::vector<std::byte> pack(b * mb * page * token_bytes);
    for (std::size_t i = 0; i < b; ++i) {
      const std::int64_t first = decode_shard_first(global[i], P, r);
      for (std::int64_t t = 0; t < sl.n[i]; ++t) {
        const std::int64_t pos = first + t;
        const std::int64_t blk =
            m.p.block_table[static_cast<std::int64_t>(i) * m.p.max_blocks + pos / page];
        std::memcpy(pack.data() + (i * mb * page + t) * token_bytes,
                    src + (static_cast<std::size_t>(blk) * page + pos % page) * token_bytes,
                    token_bytes);
      }
    }
    if (r == 0) return pack;
    for (std::size_t off = 0; off < pack.size(); off += kChunk) {
      const auto n_bytes = std::min(pack.size() - off, kChunk);
      RA_MPI_CHECK(
          MPI_Send(pack.data() + off, static_cast<int>(n_bytes), MPI_BYTE, r, 7, comm.get()));
    }
  }
  return {};  // not reached: the loop ends with rank 0's own slice
}

// This rank's params: its slice as a paged cache with the identity block table;
// results land on rank 0 only.
MlaDecodeParams local_params(const comm::Communicator& comm, const LoadedMla& m, const MlaHeader& h,
                             const Slice& mine, const void* q, void* cache,
                             const std::vector<std::int32_t>& table) {
  MlaDecodeParams p;
  if (comm.rank() == 0) p = m.p;
  p.q_dtype = static_cast<DType>(h.q_dtype);
  p.kv_dtype = static_cast<DType>(h.kv_dtype);
  p.num_splits = h.num_splits;
  p.out_dtype = DType::kF32;
  p.cache_layout = MlaCacheLayout::kDense576;
  p.b = static_cast<int>(h.b);
  p.s_q = static_cast<int>(h.s_q);
  p.h_q = static_cast<int>(h.h);
  p.causal = h.causal != 0;
  p.scale = h.scale;
  p.bmm1_scale = h.bmm1_scale;
  p.bmm2_scale = h.bmm2_scale;
  p.q = q;
  p.kv_cache = cache;
  p.num_blocks = p.b * mine.max_blocks;
  p.page_size = static_cast<int>(h.page);
  p.max_blocks = mine.max_blocks;
  p.block_table = table.data();
  p.cache_seqlens = mine.n.data();
  p.indices = nullptr;
  if (comm.rank() != 0) {
    p.out = nullptr;
    p.lse = nullptr;
  }
  return p;
}

// P > 1: the latent cache sharded across the ranks (mla_distributed_decode.hpp); the
// query is broadcast, the ranks decode their slices and merge onto rank 0.
int run_sharded(const comm::Communicator& comm, const MlaArgs& a) {
  LoadedMla m;
  std::vector<std::int32_t> global;
  std::vector<std::byte> q_local;
  const MlaHeader h = share_problem(comm, a, m, global, q_local);
  const Slice mine = slice_of(global, comm.size(), comm.rank(), static_cast<int>(h.page));
  std::vector<std::byte> cache = distribute_cache(comm, m, h, global, mine);
  std::vector<std::int32_t> table(static_cast<std::size_t>(h.b) * mine.max_blocks);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>(i);
  const MlaDecodeParams p = local_params(comm, m, h, mine, q_local.data(), cache.data(), table);
  comm.barrier();
  const double t0 = now_seconds();
  mla_distributed_decode(comm, m.engine, p, global.data(), 0);
  const double dt = now_seconds() - t0;
  if (comm.rank() == 0) {
    m.out->commit();
    if (m.lse) m.lse->commit();
    print_result(m, comm.size(), dt);
  }
  return 0;
}

}  // namespace

int cmd_mla(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  MlaArgs a;
  if (!parse_args_mpi(comm, argc, argv, options(a), kUsage, &a.vm)) return 0;
  require(a.vm, "q");
  require(a.vm, "kv-cache");
  require(a.vm, "out");
  return comm.size() == 1 ? run_single(a) : run_sharded(comm, a);
}

}  // namespace ringattn::cli
