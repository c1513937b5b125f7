// Helpers shared by the subcommands of the `ringattn` tool: option groups declared
// once (name, default, help), argument parsing with --help, .npy tensor loading with
// shape checks whose messages name the option and both shapes, conversion to the
// kernel storage dtype, output writing, timing and JSON output helpers.
//
// Error policy (see commands.hpp): bad options, shapes or values throw
// InvalidArgument (exit 2); unreadable or malformed files throw IoError (exit 1);
// both carry the option name, e.g. "--k: ..." .
#pragma once

#include <boost/program_options.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cli/args.hpp"
#include "ringattn/attention_params.hpp"
#include "ringattn/bench.hpp"  // median_of
#include "ringattn/dtype.hpp"
#include "ringattn/engine.hpp"
#include "ringattn/npy.hpp"

namespace ringattn::cli {

// ---- argument parsing ----

// Parses argv (argv[0] = subcommand name) against `desc`. Prints `usage` and the
// options to stdout and returns false on --help / -h (the caller then exits 0).
// Unknown options and bad values throw boost::program_options::error (exit 2).
// Short options are disabled so that negative numbers ("--window -1 0") parse as values.
bool parse_args(int argc, char** argv, const po::options_description& desc,
                const std::string& usage, po::variables_map* vm);

// Throws InvalidArgument "missing required option --<name>" unless vm has it.
void require(const po::variables_map& vm, const char* name);

// "1,2,4" -> {1, 2, 4}; InvalidArgument naming `opt` on anything else.
std::vector<int> parse_int_list(const std::string& opt, const std::string& text);

// Mask / score options shared by attn, kvcache, ring, decode and session: --causal,
// --window L R, --softcap C, --scale S, --sinks S.npy, --attention-chunk N.
struct MaskArgs {
  bool causal = false;
  std::vector<int> window;  // empty or {left, right}
  float softcap = 0.0f;
  float scale = 0.0f;
  std::string sinks;        // --sinks path, empty = none
  int attention_chunk = 0;  // --attention-chunk, 0 = off

  template <class V>
  void for_each(V& v) {
    v(causal, {"causal", "bottom-right causal mask (sets the right window to 0)"});
    v(window, {"window",
               "local window: two values L R, keys j with i+shift-L <= j <= i+shift+R are "
               "visible; -1 = unbounded"});
    v(softcap, {"softcap", "score soft-capping: score = C * tanh(score / C); 0 = off"});
    v(scale, {"scale", "softmax scale; 0 = 1/sqrt(head dim)"});
    v(sinks, {"sinks",
              "attention-sink logits [h] fp32 (one per query head): out *= exp(lse) / "
              "(exp(lse) + exp(sink)); the LSE excludes the sink",
              kNoDefault});
    v(attention_chunk, {"attention-chunk",
                        "chunked local attention: row i sees only keys in the size-N chunk of "
                        "its diagonal key (FA3 attention_chunk); 0 = off"});
  }
};
// Validates (window values >= -1, softcap >= 0, scale >= 0) and converts; sinks are
// loaded separately (load_sinks) once the number of query heads is known.
MaskParams to_mask_params(const MaskArgs& args);
// --sinks S.npy: attention-sink logits [h] (<f4 or <f2), one per query head; empty
// when the option is not given. InvalidArgument naming --sinks on a wrong shape or
// a NaN entry.
std::vector<float> load_sinks(const MaskArgs& args, std::int64_t h);

// Kernel options: --dtype fp32|bf16|fp16, --backend NAME, --threads N.
struct KernelArgs {
  std::string dtype = "fp32";
  std::string backend = "auto";
  int threads = 0;

  template <class V>
  void for_each(V& v) {
    v(dtype, {"dtype",
              "storage dtype of the kernel inputs: fp32 | bf16 | fp16 (file values are rounded "
              "to it)"});
    v(backend, {"backend",
                "kernel backend: auto | cpu | cpu-amx | cpu-avx512-bf16 | cpu-avx512 | cpu-avx2 | "
                "cpu-scalar | reference"});
    v(threads, {"threads", "OpenMP threads; 0 = all"});
  }
};
// The Mask and Kernel groups and the parsed command line: what attn and kvcache share
// with ring, decode and session (their args structs derive from it).
struct MaskKernelArgs {
  MaskArgs mask;
  KernelArgs kernel;
  po::variables_map vm;  // what the command line gave

  template <class V>
  void mask_and_kernel(V& f, const char* mask_caption, const char* kernel_caption) {
    f.group(mask_caption);
    mask.for_each(f);
    f.group(kernel_caption);
    kernel.for_each(f);
  }
};
// What ring, decode and session share: the Kernel group is per rank.
struct MpiCommandArgs : MaskKernelArgs {
  template <class V>
  void mask_and_kernel(V& f, const char* mask_caption) {
    MaskKernelArgs::mask_and_kernel(f, mask_caption, "Kernel (per rank)");
  }
};

// Storage dtype from --dtype (fp32, bf16 or fp16; fp8 is refused here).
DType tensor_dtype(const KernelArgs& args);
Engine make_engine(const KernelArgs& args);

// ---- fp8 e4m3 (attn and kvcache only) ----

// Storage dtype from --dtype for attn / kvcache: fp32, bf16, fp16 or fp8 (e4m3).
DType attn_tensor_dtype(const KernelArgs& args);
// open_tensor for attn / kvcache operands: with --dtype fp8 the file holds e4m3 bytes
// (|u1, read as they are; "<u1" and "|V1" too), otherwise <f4 / <f2 (a |u1 file then
// asks for --dtype fp8).
NpyFile open_attn_tensor(const std::string& opt, const std::string& path, int ndim, DType t);
// --q-descale / --k-descale / --v-descale FILE: [b, h_k] float .npy (empty path = none),
// fp8 only.
struct DescaleArgs {
  std::string q, k, v;

  template <class V>
  void for_each(V& f) {
    f(q, {"q-descale", "--dtype fp8: q descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(k, {"k-descale", "--dtype fp8: k descale [b, h_k] fp32 (default 1)", kNoDefault});
    f(v, {"v-descale", "--dtype fp8: v descale [b, h_k] fp32 (default 1)", kNoDefault});
  }
};
// The descales as loaded into `out`, pointed to by `ds` (batch stride h_k).
struct Descales {
  std::vector<float> q, k, v;
};
void load_descales(const DescaleArgs& args, DType t, std::int64_t b, std::int64_t h_k,
                   Descales& out, Fp8Descale& ds);

// ---- tensors ----

// Reads the .npy file given for option `opt` (e.g. "--q"); errors are rethrown
// with the option name in front.
NpyArray load_npy_arg(const std::string& opt, const std::string& path);
// A float tensor (<f4 or <f2) of rank `ndim`.
NpyArray load_tensor(const std::string& opt, const std::string& path, int ndim);
// An index tensor (<i4 or <i8) with exactly `shape`, as int32.
std::vector<std::int32_t> load_index(const std::string& opt, const std::string& path,
                                     const std::vector<std::int64_t>& shape);

// Element values of an in-memory float tensor converted to storage dtype `t` (rounded
// to nearest even; <f2 data kept bit-exact when t is fp16). Large inputs go through
// open_tensor + load_storage instead, which read the file straight into place.
std::vector<std::byte> to_storage(const NpyArray& a, DType t);

// The .npy file of a float tensor (<f4 or <f2) of rank `ndim` given for option `opt`:
// header read and checked, the data left in the file for load_storage().
NpyFile open_tensor(const std::string& opt, const std::string& path, int ndim);

// A tensor's elements in kernel storage dtype, in memory the kernel uses as is.
// When the file holds the storage dtype, it is the file's data mapped (no copy, no
// allocation; `writable` makes it a private copy-on-write mapping for tensors the
// kernel updates in place, such as KV caches); otherwise an uninitialised buffer
// filled by reading the file in chunks and converting (rounded to nearest even).
class StoredTensor {
 public:
  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  friend StoredTensor load_storage(const std::string&, const NpyFile&, DType, bool, float);
  NpyMapping mapping_;
  std::unique_ptr<std::byte[]> buffer_;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};
// `divisor` (fp8 caches: value / kv_scale) divides each value before rounding; it is
// only allowed where the storage dtype differs from the file's.
StoredTensor load_storage(const std::string& opt, const NpyFile& f, DType t, bool writable = false,
                          float divisor = 1.0f);

// An fp32 result tensor for option `opt`. With a path, the .npy file is created at
// once (before any computing, so that an unwritable path fails in milliseconds) and
// data() points into the file itself (written next to the path and renamed onto it
// by commit(); an OutputTensor destroyed without commit() leaves the path as it
// was, see NpyOutput). Without a path, data() is an
// uninitialised buffer. Either way, every element must be written before commit().
class OutputTensor {
 public:
  OutputTensor(const std::string& opt, const std::string& path,
               const std::vector<std::int64_t>& shape);
  float* data() const { return data_; }
  void commit();

 private:
  std::string opt_;
  NpyOutput file_;
  std::unique_ptr<float[]> buffer_;
  float* data_ = nullptr;
};

// A .npy file with the dtype and shape of `like`, created now for option `opt`
// (before computing); commit_output() fills it from storage-dtype values and closes it.
NpyOutput open_output(const std::string& opt, const std::string& path, const NpyHeader& like);
void commit_output(const std::string& opt, NpyOutput& file, const void* data, DType t,
                   NpyDType file_dtype);

// Throws InvalidArgument unless a.shape[dim_a] == b.shape[dim_b], naming both
// options, the dimension meaning and both full shapes:
//   "--k: dim 3 (head dim) = 64 must equal --q dim 3 (head dim) = 128
//    (--k shape [2, 5, 2, 64], --q shape [2, 5, 6, 128])"
void check_dim(const std::string& opt_a, const NpyHeader& a, int dim_a, const std::string& opt_b,
               const NpyHeader& b, int dim_b, const char* meaning);
// Throws InvalidArgument unless a.shape == expected.
void check_shape(const std::string& opt, const NpyHeader& a,
                 const std::vector<std::int64_t>& expected, const std::string& why);

// Writes an fp32 array to `path` (given for option `opt`).
void write_f32(const std::string& opt, const std::string& path,
               const std::vector<std::int64_t>& shape, const float* data);

// ---- attn and kvcache ----

// What attn and kvcache take from the Mask and Kernel groups, made in this order (so
// that the first bad option is the one reported): storage dtype (attn_tensor_dtype),
// mask (to_mask_params) and engine.
struct KernelSetup {
  DType dtype;
  MaskParams mask;
  Engine engine;
};
KernelSetup kernel_setup(const MaskArgs& mask, const KernelArgs& kernel);

// Heads and head dims of an attention problem, from the headers of its inputs.
struct AttnHeads {
  std::int64_t h = 0, h_k = 0, d = 0, d_v = 0;
};

// The fields FwdParams and KvCacheParams share: storage dtypes (output fp32), mask with
// the --sinks logits (`sinks` must outlive p), key splits, heads and head dims.
template <class P>
void set_attn_params(P& p, DType t, const MaskParams& mask, const std::vector<float>& sinks,
                     int num_splits, const AttnHeads& hd) {
  p.dtype = t;
  p.out_dtype = DType::kF32;
  p.mask = mask;
  if (!sinks.empty()) p.mask.sinks = sinks.data();
  p.num_splits = num_splits;
  p.h = static_cast<int>(hd.h);
  p.h_k = static_cast<int>(hd.h_k);
  p.d = static_cast<int>(hd.d);
  p.d_v = static_cast<int>(hd.d_v);
}

// InvalidArgument unless the kv heads h_k of `k_opt` (shape k) divide the heads h of
// --q (shape q); the message names both shapes.
void check_kv_heads(const char* k_opt, const NpyHeader& q, const NpyHeader& k, const AttnHeads& hd);

// --qv (FA3) of rank `ndim`: header read and checked (file dtype that of --q, d_v of
// `v_opt` within the attention kernels' limit), the data left for load_storage().
NpyFile open_qv(const std::string& path, int ndim, const NpyHeader& q, std::int64_t d_v,
                const char* v_opt);
// --qv shaped as the output `out_shape` ([total_q, h, d_v] when varlen, else
// [b, s_q, h, d_v]); the message names --q's and `v_opt`'s shapes.
void check_qv_shape(const NpyHeader& qv, const std::vector<std::int64_t>& out_shape, bool varlen,
                    const NpyHeader& q, const char* v_opt, const NpyHeader& v);

// Segment offsets [b+1] (b >= 1) given for `opt`, as int32.
std::vector<std::int32_t> load_offsets(const char* opt, const std::string& path);
// InvalidArgument unless the offsets never decrease; returns the longest segment.
int longest_segment(const char* opt, const std::vector<std::int32_t>& cu);

// --out and --lse: fp32 result files created at once (before anything is computed, so
// that a bad path fails at once), the kernel writing into them; without --out the
// output goes to a buffer, without --lse there is none.
struct OutLseFiles {
  OutputTensor out;
  std::optional<OutputTensor> lse;

  OutLseFiles(const std::string& out_path, const std::string& lse_path,
              const std::vector<std::int64_t>& out_shape,
              const std::vector<std::int64_t>& lse_shape);
  float* lse_data() const { return lse ? lse->data() : nullptr; }
  void commit();
};

// ---- misc ----

double now_seconds();  // monotonic clock
// Seconds that fn() takes (one call).
template <class Fn>
double seconds_of(Fn&& fn) {
  const double t0 = now_seconds();
  fn();
  return now_seconds() - t0;
}

// JSON output (--json) is built with nlohmann::ordered_json, which keeps the fields in
// the order they are set. Measured values go through json_number().
using Json = nlohmann::ordered_json;

// A measured value as a JSON number: rounded to 9 significant digits, written without
// a fraction when the rounded value is integral ("3", not "3.0"), and null when not
// finite (NaN, +-inf), e.g. json_number(0.1 + 0.2) == 0.3, json_number(NAN) == null.
Json json_number(double x);

// The visitor that writes an args struct's fields into a JSON object, keyed by the
// flag name with '_' for '-' (--kv-heads -> "kv_heads"): write_json(j, HeadArgs{...}).
struct JsonWriter {
  Json& j;
  void group(const char*) {}
  template <class T>
  void operator()(const T& field, const Flag& f) {
    std::string key = f.name;
    for (char& c : key)
      if (c == '-') c = '_';
    j[key] = field;
  }
};
template <class Args>
void write_json(Json& j, Args args) {
  JsonWriter w{j};
  args.for_each(w);
}

// j as compact JSON text; bytes that are not valid UTF-8 in strings become U+FFFD
// (the text is always valid JSON, the output never throws).
std::string json_dump(const Json& j);

// Writes json_dump(j) and a newline to `path`; IoError on failure.
void write_json_file(const std::string& path, const Json& j);

}  // namespace ringattn::cli
