#include "cli/cli_common.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "ringattn/error.hpp"

namespace ringattn::cli {

bool parse_args(int argc, char** argv, const po::options_description& desc,
                const std::string& usage, po::variables_map* vm) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << usage << "\n\n" << desc << "\n";
      return false;
    }
  }
  const int style = po::command_line_style::unix_style ^ po::command_line_style::allow_short;
  po::store(po::command_line_parser(argc, argv).options(desc).style(style).run(), *vm);
  po::notify(*vm);
  return true;
}

void require(const po::variables_map& vm, const char* name) {
  RA_CHECK_ARG(vm.count(name) > 0, "missing required option --" << name);
}

std::vector<int> parse_int_list(const std::string& opt, const std::string& text) {
  std::vector<int> out;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    const std::size_t comma = std::min(text.find(',', pos), text.size());
    const std::string item = text.substr(pos, comma - pos);
    std::size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    RA_CHECK_ARG(!item.empty() && used == item.size(),
                 opt << ": '" << text << "' is not a comma-separated list of integers");
    out.push_back(v);
    pos = comma + 1;
  }
  return out;
}

MaskParams to_mask_params(const MaskArgs& a) {
  MaskParams m;
  m.causal = a.causal;
  if (!a.window.empty()) {
    RA_CHECK_ARG_EQ(a.window.size(), std::size_t{2}, "--window: needs exactly two values L R");
    RA_CHECK_ARG_GE(a.window[0], -1, "--window: left size must be >= -1 (-1 = unbounded)");
    RA_CHECK_ARG_GE(a.window[1], -1, "--window: right size must be >= -1 (-1 = unbounded)");
    m.window_left = a.window[0];
    m.window_right = a.window[1];
  }
  RA_CHECK_ARG(std::isfinite(a.softcap) && a.softcap >= 0.0f,
               "--softcap: must be finite and >= 0 (0 = off), got " << a.softcap);
  RA_CHECK_ARG(std::isfinite(a.scale) && a.scale >= 0.0f,
               "--scale: must be finite and >= 0 (0 = 1/sqrt(d)), got " << a.scale);
  RA_CHECK_ARG_GE(a.attention_chunk, 0, "--attention-chunk: must be >= 0 (0 = off)");
  m.softcap = a.softcap;
  m.scale = a.scale;
  m.attention_chunk = a.attention_chunk;
  return m;
}

std::vector<float> load_sinks(const MaskArgs& a, std::int64_t h) {
  if (a.sinks.empty()) return {};
  const NpyArray s = load_npy_arg("--sinks", a.sinks);
  RA_CHECK_ARG(s.is_float() && s.ndim() == 1 && s.shape[0] == h,
               "--sinks: expected a float tensor [h] with h = " << h << " (query heads), got "
                                                                << npy_descr(s.dtype) << " "
                                                                << shape_to_string(s.shape));
  std::vector<float> v = s.to_f32();
  for (std::size_t i = 0; i < v.size(); ++i)
    RA_CHECK_ARG(!std::isnan(v[i]), "--sinks: entry " << i << " is NaN (use -inf for no sink)");
  return v;
}

DType tensor_dtype(const KernelArgs& a) {
  const DType t = parse_dtype(a.dtype, "--dtype");
  RA_CHECK_ARG(t != DType::kFP8E4M3,
               "--dtype: '" << a.dtype << "' is not supported here (expected fp32, bf16 or fp16)");
  return t;
}

DType attn_tensor_dtype(const KernelArgs& a) { return parse_dtype(a.dtype, "--dtype"); }

Engine make_engine(const KernelArgs& a) {
  RA_CHECK_ARG_GE(a.threads, 0, "--threads: must be >= 0 (0 = all)");
  EngineOptions o;
  o.backend = a.backend;
  o.threads = a.threads;
  try {
    return Engine(o);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument("--" + e.message(), __FILE__, __LINE__);  // "--backend: unknown ..."
  } catch (const UnsupportedError& e) {
    throw UnsupportedError("--" + e.message(), __FILE__, __LINE__);
  }
}

NpyArray load_npy_arg(const std::string& opt, const std::string& path) {
  try {
    return read_npy(path);
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

NpyArray load_tensor(const std::string& opt, const std::string& path, int ndim) {
  NpyArray a = load_npy_arg(opt, path);
  RA_CHECK_ARG(a.is_float(), opt << ": " << path << ": expected a float tensor (<f4 or <f2), got "
                                 << npy_descr(a.dtype));
  RA_CHECK_ARG(a.ndim() == ndim, opt << ": " << path << ": expected a " << ndim
                                     << "-d tensor, got shape " << shape_to_string(a.shape));
  return a;
}

std::vector<std::int32_t> load_index(const std::string& opt, const std::string& path,
                                     const std::vector<std::int64_t>& shape) {
  NpyArray a = load_npy_arg(opt, path);
  RA_CHECK_ARG(a.is_index(), opt << ": " << path
                                 << ": expected an integer tensor (<i4 or <i8), got "
                                 << npy_descr(a.dtype));
  RA_CHECK_ARG(a.shape == shape, opt << ": " << path << ": expected shape "
                                     << shape_to_string(shape) << ", got "
                                     << shape_to_string(a.shape));
  return a.to_i32(opt);
}

std::vector<std::byte> to_storage(const NpyArray& a, DType t) {
  const std::size_t n = static_cast<std::size_t>(a.numel());
  std::vector<std::byte> out(n * dtype_size(t));
  if ((a.dtype == NpyDType::kF32 && t == DType::kF32) ||
      (a.dtype == NpyDType::kF16 && t == DType::kF16)) {
    if (n > 0) std::memcpy(out.data(), a.data.data(), out.size());
    return out;
  }
  const std::vector<float> f = a.to_f32();
  for (std::size_t i = 0; i < n; ++i)
    store_from_f32(out.data(), static_cast<std::int64_t>(i), t, f[i]);
  return out;
}

NpyFile open_tensor(const std::string& opt, const std::string& path, int ndim) {
  try {
    NpyFile f(path);
    const NpyHeader& a = f.header();
    RA_CHECK_ARG(a.is_float(),
                 opt << ": " << path << ": expected a float tensor (<f4 or <f2), got "
                     << npy_descr(a.dtype)
                     << (a.dtype == NpyDType::kU8 ? " (e4m3 bytes need --dtype fp8)" : ""));
    RA_CHECK_ARG(a.ndim() == ndim, opt << ": " << path << ": expected a " << ndim
                                       << "-d tensor, got shape " << shape_to_string(a.shape));
    return f;
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

NpyFile open_attn_tensor(const std::string& opt, const std::string& path, int ndim, DType t) {
  if (t != DType::kFP8E4M3) return open_tensor(opt, path, ndim);  // |u1 named there
  try {
    NpyFile f(path);
    const NpyHeader& a = f.header();
    RA_CHECK_ARG(a.dtype == NpyDType::kU8, opt << ": " << path
                                               << ": --dtype fp8 expects e4m3 bytes (|u1), got "
                                               << npy_descr(a.dtype));
    RA_CHECK_ARG(a.ndim() == ndim, opt << ": " << path << ": expected a " << ndim
                                       << "-d tensor, got shape " << shape_to_string(a.shape));
    return f;
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

void load_descales(const DescaleArgs& args, DType t, std::int64_t b, std::int64_t h_k,
                   Descales& out, Fp8Descale& ds) {
  const struct {
    const char* opt;
    const std::string& path;
    std::vector<float>& dst;
    const float** ptr;
    std::int64_t* stride;
  } list[] = {{"--q-descale", args.q, out.q, &ds.q, &ds.q_batch_stride},
              {"--k-descale", args.k, out.k, &ds.k, &ds.k_batch_stride},
              {"--v-descale", args.v, out.v, &ds.v, &ds.v_batch_stride}};
  for (const auto& e : list) {
    if (e.path.empty()) continue;
    RA_CHECK_ARG(t == DType::kFP8E4M3,
                 e.opt << ": only with --dtype fp8 (got --dtype " << dtype_name(t) << ")");
    const NpyArray a = load_npy_arg(e.opt, e.path);
    RA_CHECK_ARG(a.is_float() && a.ndim() == 2 && a.shape[0] == b && a.shape[1] == h_k,
                 e.opt << ": expected a float tensor [b, h_k] = [" << b << ", " << h_k << "], got "
                       << npy_descr(a.dtype) << " " << shape_to_string(a.shape));
    e.dst = a.to_f32();
    *e.ptr = e.dst.data();
    *e.stride = h_k;
  }
}

namespace {

// dst[i] = round(src[i] / divisor) for n file elements of `from` into storage `to`.
// The common pairs get their own loops (the compiler vectorises them).
void convert_chunk(const std::byte* src, NpyDType from, std::byte* dst, DType to, std::size_t n,
                   float divisor) {
  if (from == NpyDType::kF32 && to == DType::kBF16 && divisor == 1.0f) {
    const auto* s = reinterpret_cast<const float*>(src);
    auto* d = reinterpret_cast<std::uint16_t*>(dst);
    for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    float v;
    if (from == NpyDType::kF32) {
      std::memcpy(&v, src + 4 * i, 4);
    } else {
      std::uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      v = f16_to_f32(h);
    }
    store_from_f32(dst, static_cast<std::int64_t>(i), to, divisor == 1.0f ? v : v / divisor);
  }
}

}  // namespace

StoredTensor load_storage(const std::string& opt, const NpyFile& f, DType t, bool writable,
                          float divisor) {
  try {
    const NpyHeader& h = f.header();
    const std::size_t n = static_cast<std::size_t>(h.numel());
    StoredTensor s;
    s.bytes_ = n * dtype_size(t);
    RA_CHECK_ARG((h.dtype == NpyDType::kU8) == (t == DType::kFP8E4M3),
                 opt << ": " << npy_descr(h.dtype) << " data cannot be stored as " << dtype_name(t)
                     << " (fp8 takes e4m3 bytes, |u1, as they are)");
    const bool same = (h.dtype == NpyDType::kF32 && t == DType::kF32) ||
                      (h.dtype == NpyDType::kF16 && t == DType::kF16) ||
                      (h.dtype == NpyDType::kU8 && t == DType::kFP8E4M3);
    RA_CHECK_ARG(!same || divisor == 1.0f, opt << ": a divisor needs a dtype conversion");
    if (same && f.mappable()) {
      s.mapping_ = f.map(writable);
      s.data_ = s.mapping_.data();
      return s;
    }
    s.buffer_.reset(new std::byte[std::max<std::size_t>(s.bytes_, 1)]);  // uninitialised
    s.data_ = s.buffer_.get();
    if (same) {
      f.read(s.data_, 0, n);
      return s;
    }
    // Chunks of 64K elements converted in parallel, from the file's mapped pages (no
    // copy in between), or through a small staging buffer when it cannot be mapped.
    constexpr std::size_t kChunk = std::size_t{1} << 16;
    const std::int64_t chunks = static_cast<std::int64_t>((n + kChunk - 1) / kChunk);
    const std::size_t in_item = h.itemsize(), out_item = dtype_size(t);
    if (f.mappable()) {
      const NpyMapping m = f.map(false);
#pragma omp parallel for schedule(static)
      for (std::int64_t c = 0; c < chunks; ++c) {
        const std::size_t i = static_cast<std::size_t>(c) * kChunk;
        convert_chunk(m.data() + i * in_item, h.dtype, s.buffer_.get() + i * out_item, t,
                      std::min(kChunk, n - i), divisor);
      }
      return s;
    }
    std::unique_ptr<std::byte[]> stage(new std::byte[kChunk * in_item]);
    for (std::size_t i = 0; i < n; i += kChunk) {
      const std::size_t m = std::min(kChunk, n - i);
      f.read(stage.get(), i, m);
      convert_chunk(stage.get(), h.dtype, s.buffer_.get() + i * out_item, t, m, divisor);
    }
    return s;
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

OutputTensor::OutputTensor(const std::string& opt, const std::string& path,
                           const std::vector<std::int64_t>& shape)
    : opt_(opt) {
  if (path.empty()) {
    std::size_t n = 1;
    for (const auto d : shape) n *= static_cast<std::size_t>(d);
    buffer_.reset(new float[std::max<std::size_t>(n, 1)]);  // uninitialised
    data_ = buffer_.get();
    return;
  }
  try {
    file_ = NpyOutput(path, NpyDType::kF32, shape);
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
  data_ = static_cast<float*>(file_.data());
}

void OutputTensor::commit() {
  if (!file_.is_open()) return;
  try {
    file_.commit();
  } catch (const IoError& e) {
    throw IoError(opt_ + ": " + e.message(), __FILE__, __LINE__);
  }
}

NpyOutput open_output(const std::string& opt, const std::string& path, const NpyHeader& like) {
  try {
    return NpyOutput(path, like.dtype, like.shape);
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

void commit_output(const std::string& opt, NpyOutput& file, const void* data, DType t,
                   NpyDType file_dtype) {
  const std::size_t item = npy_itemsize(file_dtype);
  const std::int64_t n = static_cast<std::int64_t>(file.data_bytes() / item);
  auto* dst = static_cast<std::byte*>(file.data());
  if ((file_dtype == NpyDType::kF32 && t == DType::kF32) ||
      (file_dtype == NpyDType::kF16 && t == DType::kF16) ||
      (file_dtype == NpyDType::kU8 && t == DType::kFP8E4M3)) {
    if (n > 0) std::memcpy(dst, data, file.data_bytes());
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = load_as_f32(data, i, t);
      if (file_dtype == NpyDType::kF32) {
        std::memcpy(dst + 4 * i, &v, 4);
      } else {
        const std::uint16_t h = f32_to_f16(v);
        std::memcpy(dst + 2 * i, &h, 2);
      }
    }
  }
  try {
    file.commit();
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

void check_dim(const std::string& opt_a, const NpyHeader& a, int dim_a, const std::string& opt_b,
               const NpyHeader& b, int dim_b, const char* meaning) {
  const std::int64_t va = a.shape.at(dim_a), vb = b.shape.at(dim_b);
  RA_CHECK_ARG(va == vb, opt_a << ": dim " << dim_a << " (" << meaning << ") = " << va
                               << " must equal " << opt_b << " dim " << dim_b << " (" << meaning
                               << ") = " << vb << " (" << opt_a << " shape "
                               << shape_to_string(a.shape) << ", " << opt_b << " shape "
                               << shape_to_string(b.shape) << ")");
}

void check_shape(const std::string& opt, const NpyHeader& a,
                 const std::vector<std::int64_t>& expected, const std::string& why) {
  RA_CHECK_ARG(a.shape == expected, opt << ": shape " << shape_to_string(a.shape) << " must be "
                                        << shape_to_string(expected) << " (" << why << ")");
}

void write_f32(const std::string& opt, const std::string& path,
               const std::vector<std::int64_t>& shape, const float* data) {
  try {
    write_npy(path, NpyDType::kF32, shape, data);
  } catch (const IoError& e) {
    throw IoError(opt + ": " + e.message(), __FILE__, __LINE__);
  }
}

KernelSetup kernel_setup(const MaskArgs& mask, const KernelArgs& kernel) {
  return {attn_tensor_dtype(kernel), to_mask_params(mask), make_engine(kernel)};
}

void check_kv_heads(const char* k_opt, const NpyHeader& q, const NpyHeader& k,
                    const AttnHeads& hd) {
  const std::int64_t h = hd.h, h_k = hd.h_k;
  RA_CHECK_ARG(h_k > 0 && h % h_k == 0,
               k_opt << ": kv heads h_k = " << h_k << " must divide --q heads h = " << h
                     << " (--q shape " << shape_to_string(q.shape) << ", " << k_opt << " shape "
                     << shape_to_string(k.shape) << ")");
}

NpyFile open_qv(const std::string& path, int ndim, const NpyHeader& q, std::int64_t d_v,
                const char* v_opt) {
  NpyFile f = open_tensor("--qv", path, ndim);
  RA_CHECK_ARG(f.header().dtype == q.dtype, "--qv: file dtype " << npy_descr(f.header().dtype)
                                                                << " must equal --q's "
                                                                << npy_descr(q.dtype));
  RA_CHECK_ARG(d_v <= kMaxHeadDim, "--qv: d_v = " << d_v << " (" << v_opt
                                                  << " head dim) exceeds the limit " << kMaxHeadDim
                                                  << " of the attention kernels; absorbed MLA "
                                                     "(d_v = 512) runs through `ringattn mla`");
  return f;
}

void check_qv_shape(const NpyHeader& qv, const std::vector<std::int64_t>& out_shape, bool varlen,
                    const NpyHeader& q, const char* v_opt, const NpyHeader& v) {
  check_shape("--qv", qv, out_shape,
              "shaped as the output [" + std::string(varlen ? "total_q" : "b, s_q") +
                  ", h, d_v]; --q shape " + shape_to_string(q.shape) + ", " + v_opt + " shape " +
                  shape_to_string(v.shape));
}

std::vector<std::int32_t> load_offsets(const char* opt, const std::string& path) {
  const NpyArray a = load_npy_arg(opt, path);
  RA_CHECK_ARG(a.ndim() == 1 && a.shape[0] >= 2,
               opt << ": expected shape [b+1] with b >= 1, got " << shape_to_string(a.shape));
  return a.to_i32(opt);
}

int longest_segment(const char* opt, const std::vector<std::int32_t>& cu) {
  int longest = 0;
  for (std::size_t i = 1; i < cu.size(); ++i) {
    RA_CHECK_ARG(cu[i] >= cu[i - 1], opt << ": must be non-decreasing, got entry " << i << " = "
                                         << cu[i] << " < entry " << i - 1 << " = " << cu[i - 1]);
    longest = std::max(longest, cu[i] - cu[i - 1]);
  }
  return longest;
}

OutLseFiles::OutLseFiles(const std::string& out_path, const std::string& lse_path,
                         const std::vector<std::int64_t>& out_shape,
                         const std::vector<std::int64_t>& lse_shape)
    : out("--out", out_path, out_shape) {
  if (!lse_path.empty()) lse.emplace("--lse", lse_path, lse_shape);
}

void OutLseFiles::commit() {
  out.commit();
  if (lse) lse->commit();
}

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// ---- JSON ----

Json json_number(double x) {
  if (!std::isfinite(x)) return nullptr;
  // Round to 9 significant digits through the decimal text: the shortest decimal that
  // reads back as the rounded double has at most 9 digits, so dump() prints it as is.
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", x);
  const double r = std::strtod(buf, nullptr);
  // Integral values below 2^53 are exactly representable as int64.
  if (std::fabs(r) < 9007199254740992.0 && r == std::trunc(r)) return static_cast<std::int64_t>(r);
  return r;
}

std::string json_dump(const Json& j) {
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

void write_json_file(const std::string& path, const Json& j) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (!f) RA_THROW(IoError, path << ": cannot open for writing: " << std::strerror(errno));
  const std::string s = json_dump(j) + "\n";
  const bool ok = std::fwrite(s.data(), 1, s.size(), f) == s.size();
  const bool closed = std::fclose(f) == 0;
  RA_CHECK(ok && closed, IoError, path << ": write failed");
}

}  // namespace ringattn::cli
