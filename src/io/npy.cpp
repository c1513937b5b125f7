#include "ringattn/npy.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string_view>

#include "ringattn/dtype.hpp"
#include "ringattn/error.hpp"

namespace ringattn {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicLen = 6;

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// Minimal parser for the header, a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
// Only the three keys numpy writes are understood; anything else is an error.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& path) : s_(text), path_(path) {}

  void parse(std::string* descr, bool* fortran, std::vector<std::int64_t>* shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    skip_ws();
    expect('{');
    for (;;) {
      skip_ws();
      if (peek() == '}') {
        ++pos_;
        break;
      }
      const std::string key = parse_string();
      skip_ws();
      expect(':');
      skip_ws();
      if (key == "descr") {
        if (peek() != '\'' && peek() != '"')
          fail("descr is not a simple type string (structured dtypes are not supported)");
        *descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran = parse_bool();
        have_fortran = true;
      } else if (key == "shape") {
        *shape = parse_shape();
        have_shape = true;
      } else {
        fail("unexpected header key '" + key + "'");
      }
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_ws();
      expect('}');
      break;
    }
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the header dict");
    if (!have_descr || !have_fortran || !have_shape)
      fail("header lacks one of 'descr', 'fortran_order', 'shape'");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    RA_THROW(IoError, path_ << ": malformed .npy header: " << what << " (at offset " << pos_
                            << " of header '" << s_ << "')");
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  std::string parse_string() {
    const char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    ++pos_;
    const std::size_t start = pos_;
    while (pos_ < s_.size() && s_[pos_] != q) ++pos_;
    if (pos_ >= s_.size()) fail("unterminated string");
    std::string out(s_.substr(start, pos_ - start));
    ++pos_;
    return out;
  }
  bool parse_bool() {
    if (s_.substr(pos_, 4) == "True") {
      pos_ += 4;
      return true;
    }
    if (s_.substr(pos_, 5) == "False") {
      pos_ += 5;
      return false;
    }
    fail("expected True or False");
  }
  std::vector<std::int64_t> parse_shape() {
    std::vector<std::int64_t> shape;
    expect('(');
    for (;;) {
      skip_ws();
      if (peek() == ')') {
        ++pos_;
        return shape;
      }
      if (peek() < '0' || peek() > '9') fail("shape entry is not a non-negative integer");
      std::int64_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int digit = peek() - '0';
        if (v > (std::numeric_limits<std::int64_t>::max() - digit) / 10)
          fail("shape entry overflows int64");
        v = v * 10 + digit;
        ++pos_;
      }
      if (peek() == 'L') ++pos_;  // Python 2 long suffix
      shape.push_back(v);
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_ws();
      expect(')');
      return shape;
    }
  }

  std::string_view s_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

bool parse_descr(const std::string& d, NpyDType* t) {
  if (d == "<f4")
    *t = NpyDType::kF32;
  else if (d == "<f2")
    *t = NpyDType::kF16;
  else if (d == "<i4")
    *t = NpyDType::kI32;
  else if (d == "<i8")
    *t = NpyDType::kI64;
  else if (d == "|u1" || d == "<u1" || d == "|V1")  // bytes: fp8 e4m3 bits
    *t = NpyDType::kU8;
  else
    return false;
  return true;
}

// pread() of exactly n bytes at `offset` (a short read is a truncated file).
void read_exact(int fd, void* dst, std::size_t n, std::uint64_t offset, const std::string& path,
                const char* what) {
  std::size_t got = 0;
  while (got < n) {
    const ssize_t r =
        ::pread(fd, static_cast<char*>(dst) + got, n - got, static_cast<off_t>(offset + got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) RA_THROW(IoError, path << ": read failed: " << std::strerror(errno));
    if (r == 0) break;
    got += static_cast<std::size_t>(r);
  }
  if (got != n)
    RA_THROW(IoError,
             path << ": truncated file: " << what << " needs " << n << " bytes, read " << got);
}

// The header text of a .npy file (magic, version, length, dict padded to 64 bytes).
std::string make_header(NpyDType dtype, const std::vector<std::int64_t>& shape,
                        const std::string& path, std::uint64_t* data_bytes) {
  std::ostringstream dict;
  dict << "{'descr': '" << npy_descr(dtype) << "', 'fortran_order': False, 'shape': (";
  std::uint64_t numel = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    RA_CHECK_ARG_GE(shape[i], 0, path << ": shape entry " << i);
    dict << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
    if (i + 1 < shape.size()) dict << ' ';
    numel *= static_cast<std::uint64_t>(shape[i]);
  }
  dict << "), }";
  std::string header = dict.str();
  // Pad with spaces so that the data starts on a 64-byte boundary; end with '\n'.
  std::size_t prefix = kMagicLen + 2 + 2;
  int major = 1;
  if (header.size() + 1 + 64 > 65535) {
    major = 2;
    prefix = kMagicLen + 2 + 4;
  }
  const std::size_t total = (prefix + header.size() + 1 + 63) / 64 * 64;
  header.append(total - prefix - header.size() - 1, ' ');
  header.push_back('\n');
  std::string head(kMagic, kMagicLen);
  head.push_back(static_cast<char>(major));
  head.push_back('\0');
  const std::size_t hl = header.size();
  for (std::size_t i = 0; i < (major == 1 ? 2u : 4u); ++i)
    head.push_back(static_cast<char>((hl >> (8 * i)) & 0xff));
  *data_bytes = numel * npy_itemsize(dtype);
  return head + header;
}

// write() of all n bytes.
bool write_all(int fd, const void* src, std::size_t n) {
  std::size_t done = 0;
  while (done < n) {
    const ssize_t r = ::write(fd, static_cast<const char*>(src) + done, n - done);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    done += static_cast<std::size_t>(r);
  }
  return true;
}

}  // namespace

const char* npy_descr(NpyDType t) {
  switch (t) {
    case NpyDType::kF32:
      return "<f4";
    case NpyDType::kF16:
      return "<f2";
    case NpyDType::kI32:
      return "<i4";
    case NpyDType::kI64:
      return "<i8";
    case NpyDType::kU8:
      return "|u1";
  }
  return "?";
}

std::size_t npy_itemsize(NpyDType t) {
  switch (t) {
    case NpyDType::kF32:
      return 4;
    case NpyDType::kF16:
      return 2;
    case NpyDType::kI32:
      return 4;
    case NpyDType::kI64:
      return 8;
    case NpyDType::kU8:
      return 1;
  }
  return 0;
}

std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

std::int64_t NpyHeader::numel() const {
  std::int64_t n = 1;
  for (const auto d : shape) n *= d;
  return n;
}

std::vector<float> NpyArray::to_f32() const {
  const std::int64_t n = numel();
  std::vector<float> out(static_cast<std::size_t>(n));
  const void* p = data.data();
  for (std::int64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case NpyDType::kF32:
        std::memcpy(&out[i], static_cast<const char*>(p) + 4 * i, 4);
        break;
      case NpyDType::kF16: {
        std::uint16_t h;
        std::memcpy(&h, static_cast<const char*>(p) + 2 * i, 2);
        out[i] = f16_to_f32(h);
        break;
      }
      case NpyDType::kI32: {
        std::int32_t v;
        std::memcpy(&v, static_cast<const char*>(p) + 4 * i, 4);
        out[i] = static_cast<float>(v);
        break;
      }
      case NpyDType::kI64: {
        std::int64_t v;
        std::memcpy(&v, static_cast<const char*>(p) + 8 * i, 8);
        out[i] = static_cast<float>(v);
        break;
      }
      case NpyDType::kU8:
        out[i] =
            static_cast<float>(std::to_integer<std::uint8_t>(data[static_cast<std::size_t>(i)]));
        break;
    }
  }
  return out;
}

std::vector<std::int32_t> NpyArray::to_i32(const std::string& what) const {
  RA_CHECK_ARG(is_index(),
               what << ": expected an integer array (<i4 or <i8), got " << npy_descr(dtype));
  const std::int64_t n = numel();
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  if (dtype == NpyDType::kI32) {
    if (n > 0) std::memcpy(out.data(), data.data(), static_cast<std::size_t>(n) * 4);
    return out;
  }
  for (std::int64_t i = 0; i < n; ++i) {
    std::int64_t v;
    std::memcpy(&v, data.data() + 8 * i, 8);
    RA_CHECK_ARG(v >= std::numeric_limits<std::int32_t>::min() &&
                     v <= std::numeric_limits<std::int32_t>::max(),
                 what << ": element " << i << " = " << v << " does not fit in int32");
    out[i] = static_cast<std::int32_t>(v);
  }
  return out;
}

// File layout (numpy/lib/format.py):
//   magic "\x93NUMPY" | major u8 | minor u8 | header_len (u16 LE for v1, u32 LE for v2/v3)
//   | header (ASCII for v1/v2, UTF-8 for v3; a dict literal ending in '\n') | raw data
NpyFile::NpyFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) RA_THROW(IoError, path << ": cannot open: " << std::strerror(errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode))
      RA_THROW(IoError, path << ": cannot determine file size (not a regular file?)");
    regular_ = true;
    const auto file_size = static_cast<std::uint64_t>(st.st_size);

    unsigned char prefix[kMagicLen + 2];
    if (file_size < sizeof(prefix))
      RA_THROW(IoError, path << ": not a .npy file: only " << file_size << " bytes");
    read_exact(fd_, prefix, sizeof(prefix), 0, path, "magic");
    if (std::memcmp(prefix, kMagic, kMagicLen) != 0)
      RA_THROW(IoError, path << ": not a .npy file: wrong magic (expected \\x93NUMPY)");
    const int major = prefix[kMagicLen], minor = prefix[kMagicLen + 1];
    if ((major != 1 && major != 2 && major != 3) || minor != 0)
      RA_THROW(IoError, path << ": unsupported .npy format version " << major << "." << minor
                             << " (supported: 1.0, 2.0, 3.0)");
    const std::size_t len_bytes = major == 1 ? 2 : 4;
    unsigned char len_buf[4] = {0, 0, 0, 0};
    read_exact(fd_, len_buf, len_bytes, sizeof(prefix), path, "header length");
    std::uint64_t header_len = 0;
    for (std::size_t i = 0; i < len_bytes; ++i) header_len |= std::uint64_t{len_buf[i]} << (8 * i);
    data_offset_ = sizeof(prefix) + len_bytes + header_len;
    if (data_offset_ > file_size)
      RA_THROW(IoError, path << ": truncated header: declares " << header_len
                             << " header bytes, file has " << file_size << " bytes in all");
    std::string header(static_cast<std::size_t>(header_len), '\0');
    read_exact(fd_, header.data(), header.size(), sizeof(prefix) + len_bytes, path, "header");

    std::string descr;
    bool fortran = false;
    HeaderParser(header, path).parse(&descr, &fortran, &header_.shape);
    if (fortran)
      RA_THROW(IoError, path << ": Fortran-order arrays are not supported (save a C-order "
                                "array, e.g. numpy.ascontiguousarray)");
    if (!parse_descr(descr, &header_.dtype))
      RA_THROW(IoError, path << ": unsupported dtype '" << descr
                             << "' (supported: <f4, <f2 for tensors, <i4, <i8 for indices)");

    // Size check before anyone allocates: a header may declare an absurd shape.
    const std::uint64_t avail = file_size - data_offset_;
    const std::uint64_t item = header_.itemsize();
    bool any_zero = false;
    for (const auto d : header_.shape) any_zero |= d == 0;
    std::uint64_t bytes = any_zero ? 0 : item;
    if (!any_zero) {
      for (const auto d : header_.shape) {
        if (static_cast<std::uint64_t>(d) > avail / bytes)  // bytes * d > avail, overflow-free
          RA_THROW(IoError, path << ": truncated data: header declares shape "
                                 << shape_to_string(header_.shape) << " of " << descr
                                 << " but only " << avail << " data bytes follow the header");
        bytes *= static_cast<std::uint64_t>(d);
      }
    }
    if (bytes != avail)
      RA_THROW(IoError, path << ": data size mismatch: header declares shape "
                             << shape_to_string(header_.shape) << " of " << descr << " = " << bytes
                             << " bytes, file has " << avail << " bytes after the header");
    data_bytes_ = bytes;
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

NpyFile::NpyFile(NpyFile&& o) noexcept
    : path_(std::move(o.path_)),
      fd_(std::exchange(o.fd_, -1)),
      regular_(o.regular_),
      header_(std::move(o.header_)),
      data_offset_(o.data_offset_),
      data_bytes_(o.data_bytes_) {}

NpyFile::~NpyFile() {
  if (fd_ >= 0) ::close(fd_);
}

void NpyFile::read(void* dst, std::uint64_t first, std::uint64_t count) const {
  const std::uint64_t item = header_.itemsize();
  RA_CHECK_ARG(first <= data_bytes_ / item && count <= data_bytes_ / item - first,
               path_ << ": elements [" << first << ", " << first + count << ") outside the "
                     << data_bytes_ / item << " elements of the file");
  read_exact(fd_, dst, static_cast<std::size_t>(count * item), data_offset_ + first * item, path_,
             "data");
}

NpyMapping NpyFile::map(bool writable) const {
  if (!mappable()) RA_THROW(IoError, path_ << ": cannot map an empty or non-regular file");
  const std::size_t length = static_cast<std::size_t>(data_offset_ + data_bytes_);
  // Populating a writable private mapping would copy every page: only read-only ones.
  const int prot = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  const int flags = writable ? MAP_PRIVATE : MAP_PRIVATE | MAP_POPULATE;
  void* base = ::mmap(nullptr, length, prot, flags, fd_, 0);
  if (base == MAP_FAILED) RA_THROW(IoError, path_ << ": cannot map: " << std::strerror(errno));
  return NpyMapping(base, length, static_cast<std::size_t>(data_offset_));
}

NpyMapping& NpyMapping::operator=(NpyMapping&& o) noexcept {
  if (this != &o) {
    if (base_) ::munmap(base_, length_);
    base_ = std::exchange(o.base_, nullptr);
    length_ = std::exchange(o.length_, 0);
    offset_ = std::exchange(o.offset_, 0);
  }
  return *this;
}

NpyMapping::~NpyMapping() {
  if (base_) ::munmap(base_, length_);
}

NpyArray read_npy(const std::string& path) {
  const NpyFile f(path);
  NpyArray a;
  static_cast<NpyHeader&>(a) = f.header();
  a.data.resize(static_cast<std::size_t>(f.data_bytes()));
  f.read(a.data.data(), 0, static_cast<std::uint64_t>(a.numel()));
  return a;
}

void write_npy(const std::string& path, NpyDType dtype, const std::vector<std::int64_t>& shape,
               const void* data) {
  std::uint64_t nbytes = 0;
  const std::string head = make_header(dtype, shape, path, &nbytes);
  File f(std::fopen(path.c_str(), "wb"));
  if (!f) RA_THROW(IoError, path << ": cannot open for writing: " << std::strerror(errno));
  bool ok = std::fwrite(head.data(), 1, head.size(), f.get()) == head.size();
  if (ok && nbytes > 0) ok = std::fwrite(data, 1, nbytes, f.get()) == nbytes;
  if (!ok) RA_THROW(IoError, path << ": write failed: " << std::strerror(errno));
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) RA_THROW(IoError, path << ": close failed: " << std::strerror(errno));
}

// Output path: header by write(), then the data region reserved (posix_fallocate, so
// that ENOSPC is reported now) and mapped shared, so that the kernel's stores land in
// the file's page cache without a later copy.
NpyOutput::NpyOutput(const std::string& path, NpyDType dtype,
                     const std::vector<std::int64_t>& shape)
    : path_(path) {
  std::uint64_t nbytes = 0;
  const std::string head = make_header(dtype, shape, path, &nbytes);
  header_bytes_ = head.size();
  data_bytes_ = static_cast<std::size_t>(nbytes);
  // A regular file (or a new one) is written as a temporary file next to it and renamed
  // over it by commit(): a file that is also an input (kvcache --k-cache-out onto
  // --k-cache) stays intact while it is read, and a failed command leaves the old file.
  // Anything else (/dev/null, a pipe) is written directly.
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  const bool regular = !exists || S_ISREG(st.st_mode);
  if (regular) {
    if (exists) {  // write through symlinks: rename onto the file they point to
      char* real = ::realpath(path.c_str(), nullptr);
      if (real) {
        target_ = real;
        std::free(real);
      }
    }
    if (target_.empty()) target_ = path;
    static int counter = 0;
    temp_ = target_ + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(++counter);
    fd_ = ::open(temp_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ >= 0 && exists) (void)::fchmod(fd_, st.st_mode & 07777);  // keep the old mode
  } else {
    fd_ = ::open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  }
  if (fd_ < 0) RA_THROW(IoError, path << ": cannot open for writing: " << std::strerror(errno));
  remove_on_error_ = regular;
  try {
    if (regular && data_bytes_ > 0) {
      map_length_ = header_bytes_ + data_bytes_;
      const int err = ::posix_fallocate(fd_, 0, static_cast<off_t>(map_length_));
      if (err != 0)
        RA_THROW(IoError,
                 path << ": cannot reserve " << map_length_ << " bytes: " << std::strerror(err));
      void* base = ::mmap(nullptr, map_length_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      if (base != MAP_FAILED) {
        map_base_ = base;
        mapped_ = true;
        std::memcpy(base, head.data(), head.size());
        data_ = static_cast<std::byte*>(base) + header_bytes_;
        return;
      }
      map_length_ = 0;
      if (::ftruncate(fd_, 0) != 0)
        RA_THROW(IoError, path << ": truncate failed: " << std::strerror(errno));
    }
    if (!write_all(fd_, head.data(), head.size()))
      RA_THROW(IoError, path << ": write failed: " << std::strerror(errno));
    buffer_.reset(new std::byte[std::max<std::size_t>(data_bytes_, 1)]);  // uninitialised
    data_ = buffer_.get();
  } catch (...) {
    release();
    throw;
  }
}

NpyOutput& NpyOutput::operator=(NpyOutput&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    target_ = std::move(o.target_);
    temp_ = std::move(o.temp_);
    fd_ = std::exchange(o.fd_, -1);
    mapped_ = o.mapped_;
    remove_on_error_ = o.remove_on_error_;
    map_base_ = std::exchange(o.map_base_, nullptr);
    map_length_ = o.map_length_;
    header_bytes_ = o.header_bytes_;
    data_bytes_ = o.data_bytes_;
    data_ = std::exchange(o.data_, nullptr);
    buffer_ = std::move(o.buffer_);
  }
  return *this;
}

void NpyOutput::commit() {
  RA_CHECK(fd_ >= 0, IoError, path_ << ": output already closed");
  bool ok = true;
  if (mapped_) {
    ok = ::munmap(map_base_, map_length_) == 0;
    map_base_ = nullptr;
  } else if (data_bytes_ > 0) {
    ok = write_all(fd_, buffer_.get(), data_bytes_);
  }
  const int err = ok ? 0 : errno;
  const bool closed = ::close(fd_) == 0;
  const int close_err = closed ? 0 : errno;
  fd_ = -1;
  buffer_.reset();
  data_ = nullptr;
  if (ok && closed && remove_on_error_) {
    if (::rename(temp_.c_str(), target_.c_str()) != 0) {
      const int e = errno;
      ::unlink(temp_.c_str());
      RA_THROW(IoError,
               path_ << ": cannot rename the written file into place: " << std::strerror(e));
    }
    return;
  }
  if (remove_on_error_) ::unlink(temp_.c_str());
  if (!ok) RA_THROW(IoError, path_ << ": write failed: " << std::strerror(err));
  if (!closed) RA_THROW(IoError, path_ << ": close failed: " << std::strerror(close_err));
}

void NpyOutput::release() noexcept {
  if (map_base_) ::munmap(map_base_, map_length_);
  map_base_ = nullptr;
  if (fd_ >= 0) {
    ::close(fd_);
    if (remove_on_error_) ::unlink(temp_.c_str());
  }
  fd_ = -1;
  buffer_.reset();
  data_ = nullptr;
}

NpyOutput::~NpyOutput() { release(); }

void write_npy(const std::string& path, const NpyArray& a) {
  RA_CHECK_ARG_EQ(a.data.size(), static_cast<std::size_t>(a.numel()) * a.itemsize(),
                  path << ": array byte size must match its shape " << shape_to_string(a.shape));
  write_npy(path, a.dtype, a.shape, a.data.data());
}

}  // namespace ringattn
