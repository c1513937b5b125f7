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
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "ringattn/error.hpp"
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
    "cache value / --kv-scale as e4m3 (the file holds real values).";

}  // namespace

int cmd_mla(int argc, char** argv) {
  std::string q_path, cache_path, table_path, lens_path, idx_path, out_path, lse_path, kv_dtype_s;
  bool causal = false;
  float scale = 0.0f, kv_scale = 0.0f;
  int num_splits = 0;
  KernelArgs kernel_args;
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
  if (!parse_args(argc, argv, all, kUsage, &vm)) return 0;
  require(vm, "q");
  require(vm, "kv-cache");
  require(vm, "out");
  const bool sparse = vm.count("indices") > 0;
  if (!sparse) {
    require(vm, "block-table");
    require(vm, "cache-seqlens");
  }
  const DType kv_dtype = parse_dtype(kv_dtype_s, "--kv-dtype");
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
  const Engine engine = make_engine(kernel_args);

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

  MlaDecodeParams p;
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

  std::vector<std::int32_t> table, lens, indices;
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
  OutputTensor out("--out", out_path, {b, s_q, h, kMlaValueDim});
  std::optional<OutputTensor> lse;
  if (!lse_path.empty()) lse.emplace("--lse", lse_path, std::vector<std::int64_t>{b, h, s_q});
  // Inputs in storage dtype: the files themselves when they hold it (mapped); an fp8
  // cache holds value / kv_scale.
  const StoredTensor q_store = load_storage("--q", q_file, q_dtype);
  const StoredTensor cache_store = load_storage("--kv-cache", cache_file, kv_dtype, false,
                                                kv_dtype == DType::kFP8E4M3 ? kv_scale : 1.0f);
  p.q = q_store.data();
  p.kv_cache = cache_store.data();
  p.out = out.data();
  p.lse = lse ? lse->data() : nullptr;

  const double t0 = now_seconds();
  engine.mla_decode(p);
  const double dt = now_seconds() - t0;

  out.commit();
  if (lse) lse->commit();
  std::printf("mla: b=%lld s_q=%lld h=%lld %s kv=%s backend=%s time %.3f ms\n",
              static_cast<long long>(b), static_cast<long long>(s_q), static_cast<long long>(h),
              sparse ? "sparse" : (causal ? "causal" : "dense"), dtype_name(kv_dtype),
              engine.backend_name().c_str(), dt * 1e3);
  return 0;
}

}  // namespace ringattn::cli
