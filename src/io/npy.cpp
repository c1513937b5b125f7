#include "ringattn/npy.hpp"

#include <cerrno>
#include <cstdio>
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
  else
    return false;
  return true;
}

void read_exact(std::FILE* f, void* dst, std::size_t n, const std::string& path, const char* what) {
  if (n == 0) return;
  const std::size_t got = std::fread(dst, 1, n, f);
  if (got != n)
    RA_THROW(IoError,
             path << ": truncated file: " << what << " needs " << n << " bytes, read " << got);
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

std::int64_t NpyArray::numel() const {
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
NpyArray read_npy(const std::string& path) {
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) RA_THROW(IoError, path << ": cannot open: " << std::strerror(errno));
  if (std::fseek(f.get(), 0, SEEK_END) != 0)
    RA_THROW(IoError, path << ": cannot seek: " << std::strerror(errno));
  const long end = std::ftell(f.get());
  if (end < 0) RA_THROW(IoError, path << ": cannot determine file size (not a regular file?)");
  std::rewind(f.get());
  const auto file_size = static_cast<std::uint64_t>(end);

  unsigned char prefix[kMagicLen + 2];
  if (file_size < sizeof(prefix))
    RA_THROW(IoError, path << ": not a .npy file: only " << file_size << " bytes");
  read_exact(f.get(), prefix, sizeof(prefix), path, "magic");
  if (std::memcmp(prefix, kMagic, kMagicLen) != 0)
    RA_THROW(IoError, path << ": not a .npy file: wrong magic (expected \\x93NUMPY)");
  const int major = prefix[kMagicLen], minor = prefix[kMagicLen + 1];
  if ((major != 1 && major != 2 && major != 3) || minor != 0)
    RA_THROW(IoError, path << ": unsupported .npy format version " << major << "." << minor
                           << " (supported: 1.0, 2.0, 3.0)");
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  unsigned char len_buf[4] = {0, 0, 0, 0};
  read_exact(f.get(), len_buf, len_bytes, path, "header length");
  std::uint64_t header_len = 0;
  for (std::size_t i = 0; i < len_bytes; ++i) header_len |= std::uint64_t{len_buf[i]} << (8 * i);
  const std::uint64_t data_offset = sizeof(prefix) + len_bytes + header_len;
  if (data_offset > file_size)
    RA_THROW(IoError, path << ": truncated header: declares " << header_len
                           << " header bytes, file has " << file_size << " bytes in all");
  std::string header(static_cast<std::size_t>(header_len), '\0');
  read_exact(f.get(), header.data(), header.size(), path, "header");

  std::string descr;
  bool fortran = false;
  NpyArray a;
  HeaderParser(header, path).parse(&descr, &fortran, &a.shape);
  if (fortran)
    RA_THROW(IoError, path << ": Fortran-order arrays are not supported (save a C-order array, "
                              "e.g. numpy.ascontiguousarray)");
  if (!parse_descr(descr, &a.dtype))
    RA_THROW(IoError, path << ": unsupported dtype '" << descr
                           << "' (supported: <f4, <f2 for tensors, <i4, <i8 for indices)");

  // Size check before allocating: a header may declare an absurd shape.
  const std::uint64_t avail = file_size - data_offset;
  const std::uint64_t item = a.itemsize();
  bool any_zero = false;
  for (const auto d : a.shape) any_zero |= d == 0;
  std::uint64_t bytes = any_zero ? 0 : item;
  if (!any_zero) {
    for (const auto d : a.shape) {
      if (static_cast<std::uint64_t>(d) > avail / bytes)  // bytes * d > avail, overflow-free
        RA_THROW(IoError, path << ": truncated data: header declares shape "
                               << shape_to_string(a.shape) << " of " << descr << " but only "
                               << avail << " data bytes follow the header");
      bytes *= static_cast<std::uint64_t>(d);
    }
  }
  if (bytes != avail)
    RA_THROW(IoError, path << ": data size mismatch: header declares shape "
                           << shape_to_string(a.shape) << " of " << descr << " = " << bytes
                           << " bytes, file has " << avail << " bytes after the header");
  a.data.resize(static_cast<std::size_t>(bytes));
  read_exact(f.get(), a.data.data(), a.data.size(), path, "data");
  return a;
}

void write_npy(const std::string& path, NpyDType dtype, const std::vector<std::int64_t>& shape,
               const void* data) {
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

  File f(std::fopen(path.c_str(), "wb"));
  if (!f) RA_THROW(IoError, path << ": cannot open for writing: " << std::strerror(errno));
  std::string head(kMagic, kMagicLen);
  head.push_back(static_cast<char>(major));
  head.push_back('\0');
  const std::size_t hl = header.size();
  for (std::size_t i = 0; i < (major == 1 ? 2u : 4u); ++i)
    head.push_back(static_cast<char>((hl >> (8 * i)) & 0xff));
  head += header;
  const std::size_t nbytes = static_cast<std::size_t>(numel) * npy_itemsize(dtype);
  bool ok = std::fwrite(head.data(), 1, head.size(), f.get()) == head.size();
  if (ok && nbytes > 0) ok = std::fwrite(data, 1, nbytes, f.get()) == nbytes;
  if (!ok) RA_THROW(IoError, path << ": write failed: " << std::strerror(errno));
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) RA_THROW(IoError, path << ": close failed: " << std::strerror(errno));
}

void write_npy(const std::string& path, const NpyArray& a) {
  RA_CHECK_ARG_EQ(a.data.size(), static_cast<std::size_t>(a.numel()) * a.itemsize(),
                  path << ": array byte size must match its shape " << shape_to_string(a.shape));
  write_npy(path, a.dtype, a.shape, a.data.data());
}

}  // namespace ringattn
