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

struct MlaOptions {
  std::string q_path, cache_path, table_path, lens_path, idx_path, out_path, lse_path, kv_dtype_s;
  bool causal = false;
  float scale = 0.0f, kv_scale = 0.0f;
  int num_splits = 0;
  KernelArgs kernel_args;
};

// Checks the options, reads the inputs and creates the output files (before anything
// is computed).
void load_mla(const MlaOptions& o, const po::variables_map& vm, LoadedMla& m) {
  const auto& [q_path, cache_path, table_path, lens_path, idx_path, out_path, lse_path, kv_dtype_s,
               causal, scale, kv_scale, num_splits, kernel_args] = o;
  const bool sparse = m.sparse = vm.count("indices") > 0;
  if (!sparse) {
    require(vm, "block-table");
    require(vm, "cache-seqlens");
  }
  const DType kv_dtype = m.kv_dtype = parse_dtype(kv_dtype_s, "--kv-dtype");
  RA_CHECK_ARG(kv_dtype == DType::kF32 || kv_dtype == DType::kBF16 || kv_dtype == DType::kFP8E4M3,
               "--kv-dtype: expected fp32, bf16 or fp8, got '" << kv_dtype_s << "'");
  RA_CHECK_ARG(std::isfinite(scale) && scale >= 0.0f, "--scale: must be >= 0, got " << scale);
  if (kv_dtype == DType::kFP8E4M3) {
    RA_CHECK_ARG(std::isfinite(kv_scale) && kv_scale > 0.0f,
                 "--kv-scale: fp8 cache needs its scale (> 0), got " << kv_scale);
  } else {
    RA_CHECK_ARG(kv_scale == 0.0f,
                 "--kv-scale: only used with --kv-dtype fp8, got --kv-dtype " << kv_dtype_s);
  }
  const DType q_dtype = tensor_dtype(kernel_args);
  m.engine = make_engine(kernel_args);

  // Headers first: every shape is checked before any data is read.
  const NpyFile q_file = open_tensor("--q", q_path, 4);
  const NpyFile cache_file = open_tensor("--kv-cache", cache_path, 3);
  const NpyHeader &q = q_file.header(), &cache = cache_file.header();
  RA_CHECK_ARG(q.shape[3] == kMlaHeadDim, "--q: last dim must be 576 (512 latent + 64 rope), got "
                                              << q.shape[3] << " (shape "
                                              << shape_to_string(q.shape) << ")");
  RA_CHECK_ARG(cache.shape[2] == kMlaHeadDim,
               "--kv-cache: last dim must be 576 (512 latent + 64 rope), got "
                   << cache.shape[2] << " (shape " << shape_to_string(cache.shape) << ")");
  const std::int64_t b = q.shape[0], s_q = q.shape[1], h = q.shape[2];

  MlaDecodeParams& p = m.p;
  p.q_dtype = q_dtype;
  p.kv_dtype = kv_dtype;
  p.out_dtype = DType::kF32;
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h);
  p.num_blocks = static_cast<int>(cache.shape[0]);
  p.page_size = static_cast<int>(cache.shape[1]);
  p.causal = causal;
  p.num_splits = num_splits;
  if (kv_dtype == DType::kFP8E4M3) {
    const float sm = scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(kMlaHeadDim));
    p.bmm1_scale = sm * kv_scale;
    p.bmm2_scale = kv_scale;
  } else {
    p.scale = scale;
  }

  auto& table = m.table;
  auto& lens = m.lens;
  auto& indices = m.indices;
  if (vm.count("block-table")) {
    const NpyArray t = load_npy_arg("--block-table", table_path);
    RA_CHECK_ARG(t.is_index() && t.ndim() == 2 && t.shape[0] == b,
                 "--block-table: expected int32/int64 [b = " << b << ", max_blocks], got shape "
                                                             << shape_to_string(t.shape));
    table = t.to_i32("--block-table");
    p.max_blocks = static_cast<int>(t.shape[1]);
    p.block_table = table.data();
  }
  if (vm.count("cache-seqlens")) {
    lens = load_index("--cache-seqlens", lens_path, {b});
    p.cache_seqlens = lens.data();
  }
  if (sparse) {
    const NpyArray t = load_npy_arg("--indices", idx_path);
    RA_CHECK_ARG(t.is_index() && t.ndim() == 3 && t.shape[0] == b && t.shape[1] == s_q,
                 "--indices: expected int32/int64 [b = " << b << ", s_q = " << s_q
                                                         << ", topk], got shape "
                                                         << shape_to_string(t.shape));
    indices = t.to_i32("--indices");
    p.indices = indices.data();
    p.topk = static_cast<int>(t.shape[2]);
  }

  // Output files are created before anything is computed (a bad path fails at once);
  // the kernel writes into them directly (it writes every element).
  m.out.emplace("--out", out_path, std::vector<std::int64_t>{b, s_q, h, kMlaValueDim});
  if (!lse_path.empty()) m.lse.emplace("--lse", lse_path, std::vector<std::int64_t>{b, h, s_q});
  // Inputs in storage dtype: the files themselves when they hold it (mapped); an fp8
  // cache holds value / kv_scale.
  m.q_store.emplace(load_storage("--q", q_file, q_dtype));
  m.cache_store.emplace(load_storage("--kv-cache", cache_file, kv_dtype, false,
                                     kv_dtype == DType::kFP8E4M3 ? kv_scale : 1.0f));
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

}  // namespace

int cmd_mla(int argc, char** argv) {
  comm::MpiRuntime runtime(nullptr, nullptr);
  const comm::Communicator comm(MPI_COMM_WORLD);
  const int P = comm.size(), rank = comm.rank();
  MlaOptions o;
  auto& [q_path, cache_path, table_path, lens_path, idx_path, out_path, lse_path, kv_dtype_s,
         causal, scale, kv_scale, num_splits, kernel_args] = o;
  po::options_description io("MLA");
  io.add_options()("q", po::value<std::string>(&q_path), "query [b, s_q, h, 576] .npy")(
      "kv-cache", po::value<std::string>(&cache_path),
      "latent cache [blocks, page, 576] .npy (real values)")(
      "block-table", po::value<std::string>(&table_path),
      "block table [b, max_blocks] int32/int64 (dense decode)")(
      "cache-seqlens", po::value<std::string>(&lens_path),
      "tokens cached per sequence [b] int32/int64 (dense decode)")(
      "indices", po::value<std::string>(&idx_path),
      "sparse MLA: global slots [b, s_q, topk], -1 = padding")(
      "causal", po::bool_switch(&causal),
      "bottom-right causal over the s_q query tokens (dense decode)")(
      "scale", po::value<float>(&scale)->default_value(0.0f),
      "softmax scale; 0 = 1/sqrt(576) (DeepSeek uses 1/sqrt(192))")(
      "kv-dtype", po::value<std::string>(&kv_dtype_s)->default_value("fp32"),
      "cache storage: fp32, bf16 or fp8 (e4m3, needs --kv-scale)")(
      "kv-scale", po::value<float>(&kv_scale)->default_value(0.0f),
      "fp8 only: the cache stores value / kv_scale")(
      "num-splits", po::value<int>(&num_splits)->default_value(0),
      "key splits per sequence: 0 = engine plan, 1 = none")(
      "out", po::value<std::string>(&out_path), "output fp32 [b, s_q, h, 512] .npy")(
      "lse", po::value<std::string>(&lse_path), "log-sum-exp fp32 [b, h, s_q] .npy");
  po::options_description kern("Kernel");
  add_kernel_options(kern, &kernel_args);
  po::options_description all;
  all.add(io).add(kern);
  po::variables_map vm;
  if (!parse_args_mpi(comm, argc, argv, all, kUsage, &vm)) return 0;
  require(vm, "q");
  require(vm, "kv-cache");
  require(vm, "out");
  if (P == 1) {
    LoadedMla m;
    load_mla(o, vm, m);
    const double t0 = now_seconds();
    m.engine.mla_decode(m.p);
    const double dt = now_seconds() - t0;
    m.out->commit();
    if (m.lse) m.lse->commit();
    print_result(m, 1, dt);
    return 0;
  }

  // P > 1: the latent cache sharded across the ranks (mla_distributed_decode.hpp).
  // Rank 0 reads everything, cuts each sequence's tokens [r L / P, (r + 1) L / P) into
  // rank r's own paged cache (pages of the same size, identity block table) and sends it;
  // the query is broadcast; the ranks decode their slices and merge onto rank 0.
  LoadedMla m;
  std::int64_t hdr[7] = {0, 0, 0, 0, 0, 0, 0};  // b, s_q, h, page, token bytes, q bytes, causal
  comm::run_collectively(comm, [&] {
    m.engine = make_engine(kernel_args);
    if (rank != 0) return;
    load_mla(o, vm, m);
    RA_CHECK(!m.sparse, UnsupportedError,
             "--indices: sparse MLA decode runs on one rank only (got " << P << " ranks)");
    hdr[0] = m.p.b;
    hdr[1] = m.p.s_q;
    hdr[2] = m.p.h_q;
    hdr[3] = m.p.page_size;
    hdr[4] = static_cast<std::int64_t>(kMlaHeadDim * dtype_size(m.p.kv_dtype));
    hdr[5] = static_cast<std::int64_t>(m.q_store->bytes());
    hdr[6] = m.p.causal;
  });
  RA_MPI_CHECK(MPI_Bcast(hdr, 7, MPI_INT64_T, 0, comm.get()));
  const int b = static_cast<int>(hdr[0]), page = static_cast<int>(hdr[3]);
  const auto token_bytes = static_cast<std::size_t>(hdr[4]);
  std::vector<std::int32_t> global(static_cast<std::size_t>(b));
  if (rank == 0) global = m.lens;
  RA_MPI_CHECK(MPI_Bcast(global.data(), b, MPI_INT32_T, 0, comm.get()));
  std::vector<std::byte> q_local(static_cast<std::size_t>(hdr[5]));
  if (rank == 0) std::memcpy(q_local.data(), m.q_store->data(), q_local.size());
  comm::broadcast_bytes(comm, 0, q_local.data(), q_local.size());
  MlaDecodeParams p;
  float bmm[3] = {0, 0, 0};
  int kinds[3] = {0, 0, 0};
  if (rank == 0) {
    p = m.p;
    bmm[0] = p.scale;
    bmm[1] = p.bmm1_scale;
    bmm[2] = p.bmm2_scale;
    kinds[0] = static_cast<int>(p.q_dtype);
    kinds[1] = static_cast<int>(p.kv_dtype);
    kinds[2] = p.num_splits;
  }
  RA_MPI_CHECK(MPI_Bcast(bmm, 3, MPI_FLOAT, 0, comm.get()));
  RA_MPI_CHECK(MPI_Bcast(kinds, 3, MPI_INT, 0, comm.get()));
  // Rank r's slice of every sequence and its paged cache.
  const auto slice = [&](int r, std::vector<std::int32_t>& n, int& max_blocks) {
    n.resize(static_cast<std::size_t>(b));
    max_blocks = 1;
    for (int i = 0; i < b; ++i) {
      n[i] = static_cast<std::int32_t>(decode_shard_length(global[i], P, r));
      max_blocks = std::max(max_blocks, (n[i] + page - 1) / page);
    }
  };
  std::vector<std::int32_t> n_local;
  int max_blocks = 0;
  slice(rank, n_local, max_blocks);
  std::vector<std::byte> cache_local(static_cast<std::size_t>(b) * max_blocks * page * token_bytes);
  if (rank == 0) {
    const auto* src = static_cast<const std::byte*>(m.p.kv_cache);
    for (int r = P - 1; r >= 0; --r) {  // rank 0's own slice last: it is the buffer kept
      std::vector<std::int32_t> n;
      int mb = 0;
      slice(r, n, mb);
      std::vector<std::byte> pack(static_cast<std::size_t>(b) * mb * page * token_bytes);
      for (int i = 0; i < b; ++i) {
        const std::int64_t first = decode_shard_first(global[i], P, r);
        for (std::int64_t t = 0; t < n[i]; ++t) {
          const std::int64_t pos = first + t;
          const std::int64_t blk = m.p.block_table[std::int64_t{i} * m.p.max_blocks + pos / page];
          std::memcpy(pack.data() + (static_cast<std::size_t>(i) * mb * page + t) * token_bytes,
                      src + (static_cast<std::size_t>(blk) * page + pos % page) * token_bytes,
                      token_bytes);
        }
      }
      if (r == 0) {
        cache_local = std::move(pack);
      } else {
        for (std::size_t off = 0; off < pack.size(); off += std::size_t{1} << 30) {
          const auto n_bytes = std::min(pack.size() - off, std::size_t{1} << 30);
          RA_MPI_CHECK(
              MPI_Send(pack.data() + off, static_cast<int>(n_bytes), MPI_BYTE, r, 7, comm.get()));
        }
      }
    }
  } else {
    for (std::size_t off = 0; off < cache_local.size(); off += std::size_t{1} << 30) {
      const auto n_bytes = std::min(cache_local.size() - off, std::size_t{1} << 30);
      RA_MPI_CHECK(MPI_Recv(cache_local.data() + off, static_cast<int>(n_bytes), MPI_BYTE, 0, 7,
                            comm.get(), MPI_STATUS_IGNORE));
    }
  }
  std::vector<std::int32_t> table(static_cast<std::size_t>(b) * max_blocks);
  for (std::size_t i = 0; i < table.size(); ++i) table[i] = static_cast<std::int32_t>(i);
  std::vector<float> out_other, lse_other;
  p.q_dtype = static_cast<DType>(kinds[0]);
  p.kv_dtype = static_cast<DType>(kinds[1]);
  p.num_splits = kinds[2];
  p.out_dtype = DType::kF32;
  p.cache_layout = MlaCacheLayout::kDense576;
  p.b = b;
  p.s_q = static_cast<int>(hdr[1]);
  p.h_q = static_cast<int>(hdr[2]);
  p.causal = hdr[6] != 0;
  p.scale = bmm[0];
  p.bmm1_scale = bmm[1];
  p.bmm2_scale = bmm[2];
  p.q = q_local.data();
  p.kv_cache = cache_local.data();
  p.num_blocks = b * max_blocks;
  p.page_size = page;
  p.max_blocks = max_blocks;
  p.block_table = table.data();
  p.cache_seqlens = n_local.data();
  p.indices = nullptr;
  if (rank != 0) {  // results land on rank 0 only
    p.out = nullptr;
    p.lse = nullptr;
  }
  comm.barrier();
  const double t0 = now_seconds();
  mla_distributed_decode(comm, m.engine, p, global.data(), 0);
  const double dt = now_seconds() - t0;
  if (rank == 0) {
    m.out->commit();
    if (m.lse) m.lse->commit();
    print_result(m, P, dt);
  }
  return 0;
}

}  // namespace ringattn::cli
