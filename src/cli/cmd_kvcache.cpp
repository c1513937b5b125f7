// `ringattn kvcache`: attention against a dense or paged KV cache with optional
// in-place append of new keys/values (docs/semantics.md section 3, FA3 flash_attn_with_kvcache).
//   --q            [b, s_q, h, d]
//   --k-cache      dense [b_cache, s_cache, h_k, d]    paged [num_blocks, page_size, h_k, d]
//   --v-cache      dense [b_cache, s_cache, h_k, d_v]  paged [num_blocks, page_size, h_k, d_v]
//   --cache-seqlens [b] valid tokens per sequence before the append
//   --page-table   [b, max_pages] (paged iff given)
//   --k-new/--v-new [b, s_new, h_k, d / d_v] appended at [cache_seqlens, +s_new)
//   --cache-batch-idx [b], --cache-leftpad [b], --rotary-cos/--rotary-sin [s_rotary, rotary_dim/2]
// Writes --out [b, s_q, h, d_v] fp32, --lse [b, h, s_q] fp32 (natural log), and the
// updated caches (--k-cache-out/--v-cache-out) in the dtype of the input cache files.
// --dtype fp8: every float operand is an e4m3 byte file (|u1), the caches written back
// as bytes; --q-descale/--k-descale/--v-descale [b, h_k]; --out/--lse stay fp32.
// Variable lengths (chunked prefill): --cu-seqlens-q [b+1] makes --q [total_q, h, d]
// (--out [total_q, h, d_v], --lse [h, total_q]); --cu-seqlens-k-new [b+1] makes
// --k-new/--v-new [total_new, h_k, d / d_v], sequence i appending its own segment.
// --qv (FA3): extra query part shaped as --out, same file dtype as --q, not rotated;
// score = scale * (q . k + qv . v), default scale 1/sqrt(d + d_v).
#include <algorithm>
#include <cstdio>
#include <optional>
#include <vector>

#include "cli/cli_common.hpp"
#include "cli/commands.hpp"
#include "ringattn/contiguous_params.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {

constexpr const char* kUsage =
    "usage: ringattn kvcache --q Q.npy --k-cache K.npy --v-cache V.npy --cache-seqlens L.npy\n"
    "                        [--page-table P.npy] [--k-new KN.npy --v-new VN.npy] [--out O.npy]\n"
    "                        [--lse LSE.npy] [--k-cache-out K2.npy --v-cache-out V2.npy] "
    "[options]\n"
    "\n"
    "Attention of --q against a KV cache (paged iff --page-table is given), appending\n"
    "--k-new/--v-new in place first. Inputs are <f4 or <f2 (--dtype fp8: |u1 files of e4m3\n"
    "bytes, caches and new rows alike, with optional --q-descale/--k-descale/--v-descale\n"
    "[b, h_k]); index tensors <i4 or <i8. --out/--lse are fp32.";

}  // namespace

int cmd_kvcache(int argc, char** argv) {
  std::string q_path, kc_path, vc_path, seqlens_path, page_table_path, k_new_path, v_new_path;
  std::string batch_idx_path, leftpad_path, cos_path, sin_path;
  std::string out_path, lse_path, kc_out_path, vc_out_path, qv_path;
  std::string cu_q_path, cu_new_path, rot_seqlens_path;
  std::string q_ds_path, k_ds_path, v_ds_path;
  bool rotary_interleaved = false;
  int num_splits = 0, max_seqlen_q = 0;
  MaskArgs mask_args;
  KernelArgs kernel_args;

  // Each flag once: name, help; the default is the variable's initial value.
  const auto flags = [&](auto& f) {
    f.group("Inputs and outputs");
    f(q_path, {"q", "queries [b, s_q, h, d]", kNoDefault});
    f(kc_path,
      {"k-cache",
       "key cache: dense [b_cache, s_cache, h_k, d] or paged [num_blocks, page_size, h_k, d]",
       kNoDefault});
    f(vc_path, {"v-cache", "value cache, same layout as --k-cache with head dim d_v", kNoDefault});
    f(seqlens_path, {"cache-seqlens",
                     "[b] int32/int64: valid tokens per sequence before the append", kNoDefault});
    f(page_table_path,
      {"page-table", "[b, max_pages] int32/int64: makes the cache paged", kNoDefault});
    f(q_ds_path, {"q-descale", "--dtype fp8: q descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(k_ds_path, {"k-descale", "--dtype fp8: k descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(v_ds_path, {"v-descale", "--dtype fp8: v descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(k_new_path, {"k-new", "new keys [b, s_new, h_k, d] appended in place", kNoDefault});
    f(v_new_path, {"v-new", "new values [b, s_new, h_k, d_v] appended in place", kNoDefault});
    f(batch_idx_path,
      {"cache-batch-idx", "[b] int: cache sequence used by each batch element (dense cache)",
       kNoDefault});
    f(leftpad_path, {"cache-leftpad", "[b] int: first valid cache token per sequence", kNoDefault});
    f(cos_path, {"rotary-cos", "rotary cos table [s_rotary, rotary_dim/2]", kNoDefault});
    f(sin_path, {"rotary-sin", "rotary sin table [s_rotary, rotary_dim/2]", kNoDefault});
    f(rot_seqlens_path,
      {"rotary-seqlens",
       "[b] int: rotary position of each sequence's first new row (default --cache-seqlens)",
       kNoDefault});
    f(rotary_interleaved,
      {"rotary-interleaved", "rotate pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)"});
    f(num_splits, {"num-splits", "split-KV: 0 = engine decides, 1 = none, n = n splits"});
    f(cu_q_path,
      {"cu-seqlens-q",
       "varlen queries: [b+1] int32/int64 offsets into --q [total_q, h, d] (chunked prefill)",
       kNoDefault});
    f(max_seqlen_q,
      {"max-seqlen-q", "varlen queries: longest query segment; 0 = from --cu-seqlens-q"});
    f(cu_new_path,
      {"cu-seqlens-k-new",
       "varlen new keys: [b+1] offsets into --k-new/--v-new [total_new, h_k, d]", kNoDefault});
    f(qv_path, {"qv",
                "FA3 qv: extra query part [b, s_q, h, d_v] (varlen [total_q, h, d_v]), same "
                "file dtype as --q (not fp8), not rotated; score = scale * (q.k + qv.v), "
                "default scale 1/sqrt(d + d_v)",
                kNoDefault});
    f(out_path, {"out", "output fp32 [b, s_q, h, d_v]", kNoDefault});
    f(lse_path, {"lse", "log-sum-exp fp32 [b, h, s_q]", kNoDefault});
    f(kc_out_path, {"k-cache-out", "updated key cache (dtype of --k-cache)", kNoDefault});
    f(vc_out_path, {"v-cache-out", "updated value cache (dtype of --v-cache)", kNoDefault});
    f.group("Mask");
    mask_args.for_each(f);
    f.group("Kernel");
    kernel_args.for_each(f);
  };
  po::variables_map vm;
  if (!parse_args(argc, argv, options_of(flags), kUsage, &vm)) return 0;
  require(vm, "q");
  require(vm, "k-cache");
  require(vm, "v-cache");
  require(vm, "cache-seqlens");
  RA_CHECK_ARG(vm.count("k-new") == vm.count("v-new"), "--k-new/--v-new: must be given together");
  RA_CHECK_ARG(vm.count("rotary-cos") == vm.count("rotary-sin"),
               "--rotary-cos/--rotary-sin: must be given together");
  RA_CHECK_ARG_GE(num_splits, 0, "--num-splits: must be >= 0");
  const bool paged = vm.count("page-table") > 0;
  RA_CHECK_ARG(!(paged && vm.count("cache-batch-idx")),
               "--cache-batch-idx: only valid with a dense cache (no --page-table)");
  const DType dtype = attn_tensor_dtype(kernel_args);
  const MaskParams mask_params = to_mask_params(mask_args);
  const Engine engine = make_engine(kernel_args);

  const bool vq = vm.count("cu-seqlens-q") > 0, vk = vm.count("cu-seqlens-k-new") > 0;
  RA_CHECK_ARG(vq || vm["max-seqlen-q"].defaulted(),
               "--max-seqlen-q: only valid with --cu-seqlens-q");
  RA_CHECK_ARG(!vk || vm.count("k-new"), "--cu-seqlens-k-new: needs --k-new/--v-new");
  RA_CHECK_ARG_GE(max_seqlen_q, 0, "--max-seqlen-q: must be >= 0");
  // Headers first: every shape is checked before any data is read.
  const NpyFile q_file = open_attn_tensor("--q", q_path, vq ? 3 : 4, dtype);
  const int qh = vq ? 1 : 2;  // index of the heads dim of --q
  const NpyFile kc_file = open_attn_tensor("--k-cache", kc_path, 4, dtype);
  const NpyFile vc_file = open_attn_tensor("--v-cache", vc_path, 4, dtype);
  const NpyHeader &q = q_file.header(), &kc = kc_file.header(), &vc = vc_file.header();
  check_dim("--v-cache", vc, 0, "--k-cache", kc, 0, paged ? "blocks" : "cache sequences");
  check_dim("--v-cache", vc, 1, "--k-cache", kc, 1, paged ? "page size" : "cache capacity");
  check_dim("--v-cache", vc, 2, "--k-cache", kc, 2, "kv heads");
  check_dim("--k-cache", kc, 3, "--q", q, qh + 1, "head dim");
  // Offsets [b+1]: start at 0, non-decreasing, end at the rows of `rows_opt`.
  const auto load_cu = [](const char* opt, const std::string& path, std::int64_t rows,
                          const char* rows_opt, std::int64_t* longest) {
    const NpyArray a = load_npy_arg(opt, path);
    RA_CHECK_ARG(a.ndim() == 1 && a.shape[0] >= 2,
                 opt << ": expected shape [b+1] with b >= 1, got " << shape_to_string(a.shape));
    std::vector<std::int32_t> cu = a.to_i32(opt);
    RA_CHECK_ARG_EQ(cu.front(), 0, opt << ": first entry");
    *longest = 0;
    for (std::size_t i = 1; i < cu.size(); ++i) {
      RA_CHECK_ARG(cu[i] >= cu[i - 1], opt << ": must be non-decreasing, got entry " << i << " = "
                                           << cu[i] << " < entry " << i - 1 << " = " << cu[i - 1]);
      *longest = std::max<std::int64_t>(*longest, cu[i] - cu[i - 1]);
    }
    RA_CHECK_ARG_EQ(std::int64_t{cu.back()}, rows,
                    opt << ": last entry must equal the rows of " << rows_opt);
    return cu;
  };
  std::vector<std::int32_t> cu_q, cu_new;
  std::int64_t longest_q = 0;
  if (vq) cu_q = load_cu("--cu-seqlens-q", cu_q_path, q.shape[0], "--q", &longest_q);
  if (vq && max_seqlen_q > 0)
    RA_CHECK_ARG_GE(max_seqlen_q, longest_q, "--max-seqlen-q: must cover the longest segment");
  const std::int64_t b = vq ? static_cast<std::int64_t>(cu_q.size()) - 1 : q.shape[0];
  const std::int64_t s_q = vq ? (max_seqlen_q > 0 ? max_seqlen_q : longest_q) : q.shape[1];
  const std::int64_t total_q = vq ? q.shape[0] : b * s_q;
  const std::int64_t h = q.shape[qh], d = q.shape[qh + 1];
  const std::int64_t h_k = kc.shape[2], d_v = vc.shape[3];
  RA_CHECK_ARG(h_k > 0 && h % h_k == 0,
               "--k-cache: kv heads h_k = " << h_k << " must divide --q heads h = " << h
                                            << " (--q shape " << shape_to_string(q.shape)
                                            << ", --k-cache shape " << shape_to_string(kc.shape)
                                            << ")");

  const std::vector<float> sinks = load_sinks(mask_args, h);
  KvCacheParams p;
  p.dtype = dtype;
  p.out_dtype = DType::kF32;
  p.mask = mask_params;
  if (!sinks.empty()) p.mask.sinks = sinks.data();
  p.num_splits = num_splits;
  p.b = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h = static_cast<int>(h);
  p.h_k = static_cast<int>(h_k);
  p.d = static_cast<int>(d);
  p.d_v = static_cast<int>(d_v);

  Descales descales;
  load_descales(q_ds_path, k_ds_path, v_ds_path, dtype, b, h_k, descales, p.descale);

  const std::vector<std::int32_t> seqlens = load_index("--cache-seqlens", seqlens_path, {b});
  p.cache_seqlens = seqlens.data();
  std::vector<std::int32_t> page_table, batch_idx, leftpad;
  if (paged) {
    const NpyArray pt = load_npy_arg("--page-table", page_table_path);
    RA_CHECK_ARG(pt.is_index() && pt.ndim() == 2 && pt.shape[0] == b,
                 "--page-table: expected an integer tensor [b, max_pages] with b = "
                     << b << " (from --q), got " << npy_descr(pt.dtype) << " "
                     << shape_to_string(pt.shape));
    page_table = pt.to_i32("--page-table");
    p.page_table = page_table.data();
    p.max_pages = static_cast<int>(pt.shape[1]);
    p.num_blocks = static_cast<int>(kc.shape[0]);
    p.page_size = static_cast<int>(kc.shape[1]);
  } else {
    p.b_cache = static_cast<int>(kc.shape[0]);
    p.s_cache = static_cast<int>(kc.shape[1]);
  }
  if (vm.count("cache-batch-idx")) {
    batch_idx = load_index("--cache-batch-idx", batch_idx_path, {b});
    p.cache_batch_idx = batch_idx.data();
  }
  if (vm.count("cache-leftpad")) {
    leftpad = load_index("--cache-leftpad", leftpad_path, {b});
    p.cache_leftpad = leftpad.data();
  }

  StoredTensor k_new_s, v_new_s;
  if (vm.count("k-new")) {
    const int nd = vk ? 3 : 4, nh = nd - 2;  // rank and heads dim of --k-new/--v-new
    const NpyFile kn_file = open_attn_tensor("--k-new", k_new_path, nd, dtype);
    const NpyFile vn_file = open_attn_tensor("--v-new", v_new_path, nd, dtype);
    const NpyHeader &kn = kn_file.header(), &vn = vn_file.header();
    if (!vk) {
      RA_CHECK_ARG_EQ(kn.shape[0], b, "--k-new: batch (dim 0) must equal the batch of --q");
      check_dim("--v-new", vn, 0, "--k-new", kn, 0, "batch");
    }
    check_dim("--v-new", vn, nh - 1, "--k-new", kn, nh - 1, "new tokens");
    check_dim("--k-new", kn, nh, "--k-cache", kc, 2, "kv heads");
    check_dim("--v-new", vn, nh, "--k-cache", kc, 2, "kv heads");
    check_dim("--k-new", kn, nh + 1, "--k-cache", kc, 3, "head dim");
    check_dim("--v-new", vn, nh + 1, "--v-cache", vc, 3, "value head dim");
    std::int64_t longest_new = 0;
    if (vk) {
      cu_new = load_cu("--cu-seqlens-k-new", cu_new_path, kn.shape[0], "--k-new", &longest_new);
      RA_CHECK_ARG_EQ(static_cast<std::int64_t>(cu_new.size()) - 1, b,
                      "--cu-seqlens-k-new: batch (entries - 1) must equal the batch of --q");
      p.cu_seqlens_k_new = cu_new.data();
    }
    k_new_s = load_storage("--k-new", kn_file, dtype);
    v_new_s = load_storage("--v-new", vn_file, dtype);
    p.s_new = static_cast<int>(vk ? longest_new : kn.shape[1]);
    p.k_new = k_new_s.data();
    p.v_new = v_new_s.data();
  }

  std::vector<float> rot_cos, rot_sin;
  if (vm.count("rotary-cos")) {
    const NpyArray c = load_tensor("--rotary-cos", cos_path, 2);
    const NpyArray s = load_tensor("--rotary-sin", sin_path, 2);
    check_shape("--rotary-sin", s, c.shape, "must match --rotary-cos");
    RA_CHECK_ARG(c.shape[1] >= 1 && 2 * c.shape[1] <= d,
                 "--rotary-cos: rotary_dim = 2 * " << c.shape[1] << " must be in [2, head dim " << d
                                                   << "] (shape " << shape_to_string(c.shape)
                                                   << ")");
    rot_cos = c.to_f32();
    rot_sin = s.to_f32();
    p.rotary_cos = rot_cos.data();
    p.rotary_sin = rot_sin.data();
    p.rotary_dim = static_cast<int>(2 * c.shape[1]);
    p.s_rotary = static_cast<int>(c.shape[0]);
    p.rotary_interleaved = rotary_interleaved;
  }
  std::vector<std::int32_t> rot_seqlens;
  if (vm.count("rotary-seqlens")) {
    RA_CHECK_ARG(vm.count("rotary-cos"), "--rotary-seqlens: needs --rotary-cos/--rotary-sin");
    rot_seqlens = load_index("--rotary-seqlens", rot_seqlens_path, {b});
    p.rotary_seqlens = rot_seqlens.data();
  }

  // Output files are created before anything is computed (a bad path fails at once);
  // the kernel writes out/lse into them directly (it writes every element).
  const std::vector<std::int64_t> out_shape =
      vq ? std::vector<std::int64_t>{total_q, h, d_v} : std::vector<std::int64_t>{b, s_q, h, d_v};
  const std::vector<std::int64_t> lse_shape =
      vq ? std::vector<std::int64_t>{h, total_q} : std::vector<std::int64_t>{b, h, s_q};
  std::optional<NpyFile> qv_file;
  if (vm.count("qv")) {
    qv_file.emplace(open_tensor("--qv", qv_path, vq ? 3 : 4));
    RA_CHECK_ARG(qv_file->header().dtype == q.dtype,
                 "--qv: file dtype " << npy_descr(qv_file->header().dtype) << " must equal --q's "
                                     << npy_descr(q.dtype));
    RA_CHECK_ARG(d_v <= kMaxHeadDim, "--qv: d_v = " << d_v << " (--v-cache head dim) exceeds the "
                                                    << "limit " << kMaxHeadDim
                                                    << " of the attention kernels; absorbed MLA "
                                                       "(d_v = 512) runs through `ringattn mla`");
    check_shape("--qv", qv_file->header(), out_shape,
                "shaped as the output [" + std::string(vq ? "total_q" : "b, s_q") +
                    ", h, d_v]; --q shape " + shape_to_string(q.shape) + ", --v-cache shape " +
                    shape_to_string(vc.shape));
  }
  OutputTensor out("--out", out_path, out_shape);
  std::optional<OutputTensor> lse;
  if (!lse_path.empty()) lse.emplace("--lse", lse_path, lse_shape);
  NpyOutput kc_out, vc_out;
  if (!kc_out_path.empty()) kc_out = open_output("--k-cache-out", kc_out_path, kc);
  if (!vc_out_path.empty()) vc_out = open_output("--v-cache-out", vc_out_path, vc);
  // Inputs in storage dtype: the files themselves when they hold it (mapped; the
  // caches copy-on-write, as the append writes into them and never into the files).
  const StoredTensor qs = load_storage("--q", q_file, dtype);
  std::optional<StoredTensor> qvs;
  if (qv_file) qvs.emplace(load_storage("--qv", *qv_file, dtype));
  p.qv = qvs ? qvs->data() : nullptr;
  const StoredTensor kcs = load_storage("--k-cache", kc_file, dtype, true),
                     vcs = load_storage("--v-cache", vc_file, dtype, true);
  if (vq) p.cu_seqlens_q = cu_q.data();
  p.q = qs.data();
  p.k_cache = kcs.data();
  p.v_cache = vcs.data();
  p.out = out.data();
  p.lse = lse ? lse->data() : nullptr;
  set_contiguous_strides(p);

  const double t0 = now_seconds();
  engine.forward_kvcache(p);
  const double elapsed = now_seconds() - t0;

  out.commit();
  if (lse) lse->commit();
  if (kc_out.is_open()) commit_output("--k-cache-out", kc_out, kcs.data(), dtype, kc.dtype);
  if (vc_out.is_open()) commit_output("--v-cache-out", vc_out, vcs.data(), dtype, vc.dtype);
  std::printf(
      "kvcache: %s b=%d s_q=%d h=%d h_k=%d d=%d d_v=%d s_new=%d dtype=%s backend=%s threads=%d: "
      "%.3f ms\n",
      paged ? "paged" : "dense", p.b, p.s_q, p.h, p.h_k, p.d, p.d_v, p.s_new, dtype_name(dtype),
      engine.backend_name().c_str(), engine.threads(), elapsed * 1e3);
  return 0;
}

}  // namespace ringattn::cli
