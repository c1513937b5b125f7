// NumPy .npy file I/O (format versions 1.0, 2.0 and 3.0), the tensor exchange
// format of the `ringattn` tool. Only little-endian C-order arrays of the dtypes
// below are accepted; anything else is an IoError naming the file and the problem.
//
//   "<f4"  float32     "<f2"  IEEE float16     (tensors)
//   "<i4"  int32       "<i8"  int64            (index tensors: cu_seqlens, page tables)
//   "|u1"  uint8 (also read: "<u1", "|V1")     (fp8 e4m3 bits, `--dtype fp8`)
//
// The reader checks every size declared in the header against the file size before
// it allocates, so a corrupt or hostile header can neither crash nor exhaust memory.
// The writer always writes version 1.0 (2.0 when the header needs it), C order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace ringattn {

enum class NpyDType : std::uint8_t { kF32, kF16, kI32, kI64, kU8 };

// "<f4", "<f2", "<i4", "<i8", "|u1".
const char* npy_descr(NpyDType t);
std::size_t npy_itemsize(NpyDType t);

// "[2, 3, 4]" (used in shape error messages everywhere in the tool).
std::string shape_to_string(const std::vector<std::int64_t>& shape);

// What the header of a .npy file declares: dtype and C-order shape.
struct NpyHeader {
  NpyDType dtype = NpyDType::kF32;
  std::vector<std::int64_t> shape;  // C order; empty = 0-d scalar

  std::int64_t numel() const;
  std::size_t itemsize() const { return npy_itemsize(dtype); }
  int ndim() const { return static_cast<int>(shape.size()); }
  bool is_float() const { return dtype == NpyDType::kF32 || dtype == NpyDType::kF16; }
  bool is_index() const { return dtype == NpyDType::kI32 || dtype == NpyDType::kI64; }
};

// A whole .npy file in memory (small arrays: index tensors, tests). Large tensors
// are read with NpyFile straight into the memory that uses them.
struct NpyArray : NpyHeader {
  std::vector<std::byte> data;  // numel() * itemsize() bytes, little-endian

  // Element values converted to float32 (f2 widened exactly); index dtypes too.
  std::vector<float> to_f32() const;
  // Element values of an index array as int32; InvalidArgument naming `what`
  // when the array is a float array or an int64 value does not fit in int32.
  std::vector<std::int32_t> to_i32(const std::string& what) const;
};

// A read-only (or private copy-on-write) mapping of a file's data; unmapped on
// destruction. data() is the first data byte, size() the data bytes.
class NpyMapping {
 public:
  NpyMapping() = default;
  NpyMapping(void* base, std::size_t length, std::size_t offset)
      : base_(base), length_(length), offset_(offset) {}
  NpyMapping(NpyMapping&& o) noexcept { *this = std::move(o); }
  NpyMapping& operator=(NpyMapping&& o) noexcept;
  NpyMapping(const NpyMapping&) = delete;
  NpyMapping& operator=(const NpyMapping&) = delete;
  ~NpyMapping();

  std::byte* data() const { return static_cast<std::byte*>(base_) + offset_; }
  std::size_t size() const { return length_ - offset_; }

 private:
  void* base_ = nullptr;
  std::size_t length_ = 0;  // bytes mapped from file offset 0
  std::size_t offset_ = 0;  // first data byte
};

// An open .npy file whose header has been parsed and checked against the file size
// (the same checks and IoErrors as read_npy); the data is then read or mapped
// straight into the caller's memory, never through an intermediate copy.
class NpyFile {
 public:
  explicit NpyFile(const std::string& path);
  NpyFile(NpyFile&& o) noexcept;
  NpyFile& operator=(NpyFile&&) = delete;
  NpyFile(const NpyFile&) = delete;
  NpyFile& operator=(const NpyFile&) = delete;
  ~NpyFile();

  const NpyHeader& header() const { return header_; }
  const std::vector<std::int64_t>& shape() const { return header_.shape; }
  const std::string& path() const { return path_; }
  std::uint64_t data_bytes() const { return data_bytes_; }

  // Reads elements [first, first + count) into dst (count * itemsize bytes).
  void read(void* dst, std::uint64_t first, std::uint64_t count) const;
  // Maps the data: read-only, or private copy-on-write when `writable` (writes never
  // reach the file). Read-only mappings are populated up front. IoError when the file
  // cannot be mapped (e.g. a pipe): read() into a buffer instead.
  NpyMapping map(bool writable) const;
  // Whether map() can work (a regular file with data).
  bool mappable() const { return regular_ && data_bytes_ > 0; }

 private:
  std::string path_;
  int fd_ = -1;
  bool regular_ = false;
  NpyHeader header_;
  std::uint64_t data_offset_ = 0, data_bytes_ = 0;
};

// A .npy file being written: the header is written when it is opened, the data is
// written by the caller straight into the file's pages (a shared mapping of the
// file, its blocks reserved up front so that a full disk is an IoError here rather
// than a fault later). Opening it before computing checks the path early. A regular
// file is written as "<path>.tmp-<pid>-<n>" in the same directory and renamed onto
// <path> by commit(), so <path> may also be an input that is still being read, and
// an NpyOutput destroyed without commit() (an error on the way) removes the
// temporary file and leaves <path> as it was. Paths that are not regular files
// (pipes, /dev/null) are written directly, from a heap buffer, by commit().
class NpyOutput {
 public:
  NpyOutput() = default;
  NpyOutput(const std::string& path, NpyDType dtype, const std::vector<std::int64_t>& shape);
  NpyOutput(NpyOutput&& o) noexcept { *this = std::move(o); }
  NpyOutput& operator=(NpyOutput&& o) noexcept;
  NpyOutput(const NpyOutput&) = delete;
  NpyOutput& operator=(const NpyOutput&) = delete;
  ~NpyOutput();

  bool is_open() const { return fd_ >= 0; }
  void* data() const { return data_; }  // data_bytes() bytes, contents unspecified
  std::size_t data_bytes() const { return data_bytes_; }
  // Flushes (heap buffer) and closes the file; IoError on failure.
  void commit();

 private:
  void release() noexcept;
  std::string path_, target_, temp_;  // as given; renamed onto; written
  int fd_ = -1;
  bool mapped_ = false, remove_on_error_ = false;
  void* map_base_ = nullptr;
  std::size_t map_length_ = 0, header_bytes_ = 0, data_bytes_ = 0;
  void* data_ = nullptr;
  std::unique_ptr<std::byte[]> buffer_;
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
