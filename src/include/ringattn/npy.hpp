// NumPy .npy file I/O (format versions 1.0, 2.0 and 3.0), the tensor exchange
// format of the `ringattn` tool. Only little-endian C-order arrays of the dtypes
// below are accepted; anything else is an IoError naming the file and the problem.
//
//   "<f4"  float32     "<f2"  IEEE float16     (tensors)
//   "<i4"  int32       "<i8"  int64            (index tensors: cu_seqlens, page tables)
//
// The reader checks every size declared in the header against the file size before
// it allocates, so a corrupt or hostile header can neither crash nor exhaust memory.
// The writer always writes version 1.0 (2.0 when the header needs it), C order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ringattn {

enum class NpyDType : std::uint8_t { kF32, kF16, kI32, kI64 };

// "<f4", "<f2", "<i4", "<i8".
const char* npy_descr(NpyDType t);
std::size_t npy_itemsize(NpyDType t);

// "[2, 3, 4]" (used in shape error messages everywhere in the tool).
std::string shape_to_string(const std::vector<std::int64_t>& shape);

struct NpyArray {
  NpyDType dtype = NpyDType::kF32;
  std::vector<std::int64_t> shape;  // C order; empty = 0-d scalar
  std::vector<std::byte> data;      // numel() * itemsize() bytes, little-endian

  std::int64_t numel() const;
  std::size_t itemsize() const { return npy_itemsize(dtype); }
  int ndim() const { return static_cast<int>(shape.size()); }
  bool is_float() const { return dtype == NpyDType::kF32 || dtype == NpyDType::kF16; }
  bool is_index() const { return !is_float(); }

  // Element values converted to float32 (f2 widened exactly); index dtypes too.
  std::vector<float> to_f32() const;
  // Element values of an index array as int32; InvalidArgument naming `what`
  // when the array is a float array or an int64 value does not fit in int32.
  std::vector<std::int32_t> to_i32(const std::string& what) const;
};

// Reads a .npy file. Throws IoError ("<path>: <what is wrong>") on a missing or
// unreadable file, bad magic, unsupported version, malformed/truncated header,
// Fortran order, unsupported dtype, or a data size different from the header's.
NpyArray read_npy(const std::string& path);

// Writes `data` (numel(shape) * itemsize bytes) as a C-order .npy file.
// Throws IoError when the file cannot be written.
void write_npy(const std::string& path, NpyDType dtype, const std::vector<std::int64_t>& shape,
               const void* data);
void write_npy(const std::string& path, const NpyArray& a);

}  // namespace ringattn
