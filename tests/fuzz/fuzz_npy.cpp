// libFuzzer target for the .npy reader (ringattn/npy.hpp) on arbitrary bytes.
// Invariants, any violation aborts:
//  - read_npy either returns an array or throws ringattn::IoError, nothing else;
//  - no crash, no out-of-bounds access, no undefined behaviour, and no allocation
//    larger than the file justifies (a header declaring a huge shape must fail
//    before allocating: libFuzzer's -rss_limit_mb / -malloc_limit_mb catch it);
//  - an accepted array is self-consistent (data size = product of shape x itemsize,
//    never more than the file) and survives write_npy -> read_npy unchanged.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "fuzz_common.hpp"
#include "ringattn/error.hpp"
#include "ringattn/npy.hpp"

namespace {

constexpr const char* kTarget = "fuzz_npy";

// One temp file per process, rewritten for every input.
std::string temp_path(const char* tag) {
  const char* dir = std::getenv("TMPDIR");
  std::string path =
      std::string(dir && *dir ? dir : "/tmp") + "/ringattn_fuzz_npy_" + tag + "_XXXXXX";
  const int fd = mkstemp(path.data());
  if (fd < 0) ringattn::fuzz::fail(kTarget, "cannot create a temp file");
  close(fd);
  return path;
}

struct TempFiles {
  std::string in = temp_path("in");
  std::string out = temp_path("out");
  ~TempFiles() {
    std::remove(in.c_str());
    std::remove(out.c_str());
  }
};

void write_file(const std::string& path, const std::uint8_t* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) ringattn::fuzz::fail(kTarget, "cannot open the temp file");
  if (size > 0 && std::fwrite(data, 1, size, f) != size)
    ringattn::fuzz::fail(kTarget, "short write");
  std::fclose(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using ringattn::fuzz::fail;
  static TempFiles files;
  write_file(files.in, data, size);
  ringattn::NpyArray a;
  try {
    a = ringattn::read_npy(files.in);
  } catch (const ringattn::IoError& e) {
    if (std::strstr(e.what(), files.in.c_str()) == nullptr)
      fail(kTarget, "IoError does not name the file");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_npy: unexpected exception: %s\n", e.what());
    std::abort();
  }
  // Accepted: the array must be consistent with its header and the file.
  std::int64_t numel = 1;
  for (std::int64_t d : a.shape) {
    if (d < 0) fail(kTarget, "accepted a negative dimension");
    numel *= d;
  }
  if (numel != a.numel()) fail(kTarget, "numel() differs from the product of the shape");
  if (a.data.size() != static_cast<std::size_t>(numel) * a.itemsize())
    fail(kTarget, "data size differs from shape x itemsize");
  if (a.data.size() > size) fail(kTarget, "more data than the file holds");
  if (a.to_f32().size() != static_cast<std::size_t>(numel)) fail(kTarget, "to_f32 size");
  if (a.is_index()) {
    try {
      if (a.to_i32("fuzz").size() != static_cast<std::size_t>(numel)) fail(kTarget, "to_i32 size");
    } catch (const ringattn::InvalidArgument&) {  // an int64 value outside int32
    }
  }
  // Round trip through the writer.
  try {
    ringattn::write_npy(files.out, a);
    const ringattn::NpyArray b = ringattn::read_npy(files.out);
    if (b.dtype != a.dtype || b.shape != a.shape || b.data != a.data)
      fail(kTarget, "write_npy -> read_npy changed the array");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_npy: round trip failed: %s\n", e.what());
    std::abort();
  }
  return 0;
}
