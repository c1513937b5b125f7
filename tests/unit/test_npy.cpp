// .npy reader/writer: round trips, all header versions, and every malformed-file
// case the reader must reject with an IoError naming the file and the problem.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "ringattn/error.hpp"
#include "ringattn/npy.hpp"

namespace ringattn {
namespace {

class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("ringattn_npy_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes raw bytes to a file and returns its path.
  std::string write_raw(const std::string& name, const std::string& bytes) const {
    const std::string p = path(name);
    std::FILE* f = std::fopen(p.c_str(), "wb");
    EXPECT_NE(f, nullptr);
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
    return p;
  }

  // A .npy file of the given version with `dict` as header and `data_bytes` bytes of data.
  static std::string make_npy(int major, const std::string& dict, std::size_t data_bytes) {
    std::string header = dict;
    const std::size_t prefix = major == 1 ? 10 : 12;
    while ((prefix + header.size() + 1) % 64 != 0) header.push_back(' ');
    header.push_back('\n');
    std::string s("\x93NUMPY", 6);
    s.push_back(static_cast<char>(major));
    s.push_back('\0');
    const std::size_t n = header.size();
    for (std::size_t i = 0; i < (major == 1 ? 2u : 4u); ++i)
      s.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
    s += header;
    s.append(data_bytes, '\x01');
    return s;
  }

  // Expects read_npy to throw IoError whose message names the file and contains `what`.
  void expect_io_error(const std::string& p, const std::string& what) const {
    try {
      (void)read_npy(p);
      FAIL() << "no error for " << p;
    } catch (const IoError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(p), std::string::npos) << msg;
      EXPECT_NE(msg.find(what), std::string::npos) << "expected '" << what << "' in: " << msg;
    }
  }

  std::filesystem::path dir_;
};

TEST_F(NpyTest, RoundTripAllDtypesAndShapes) {
  std::mt19937 rng(1234);
  const std::vector<std::vector<std::int64_t>> shapes = {{},           {7},    {3, 5},
                                                         {2, 3, 4, 5}, {0, 4}, {4, 0, 2}};
  for (const NpyDType t : {NpyDType::kF32, NpyDType::kF16, NpyDType::kI32, NpyDType::kI64}) {
    for (const auto& shape : shapes) {
      NpyArray a;
      a.dtype = t;
      a.shape = shape;
      a.data.resize(static_cast<std::size_t>(a.numel()) * a.itemsize());
      for (auto& b : a.data) b = static_cast<std::byte>(rng() & 0xff);
      const std::string p = path("a.npy");
      write_npy(p, a);
      // The data must start on a 64-byte boundary (numpy's alignment).
      EXPECT_EQ((std::filesystem::file_size(p) - a.data.size()) % 64, 0u);
      const NpyArray b = read_npy(p);
      EXPECT_EQ(b.dtype, t);
      EXPECT_EQ(b.shape, shape) << shape_to_string(shape);
      EXPECT_EQ(b.data, a.data);
    }
  }
}

TEST_F(NpyTest, ReadsVersions1To3AndHeaderSpellings) {
  const float vals[6] = {1, 2, 3, 4, 5, 6};
  for (const int major : {1, 2, 3}) {
    std::string s =
        make_npy(major, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0);
    s.append(reinterpret_cast<const char*>(vals), sizeof(vals));
    const NpyArray a = read_npy(write_raw("v" + std::to_string(major) + ".npy", s));
    ASSERT_EQ(a.shape, (std::vector<std::int64_t>{2, 3}));
    EXPECT_EQ(a.to_f32(), std::vector<float>(vals, vals + 6));
  }
  // Key order, double quotes, no trailing comma, 1-d tuple.
  std::string s =
      make_npy(1, "{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<i8\"}", 16);
  const NpyArray a = read_npy(write_raw("order.npy", s));
  EXPECT_EQ(a.dtype, NpyDType::kI64);
  EXPECT_EQ(a.shape, (std::vector<std::int64_t>{2}));
}

TEST_F(NpyTest, HalfAndIndexConversions) {
  const std::uint16_t h[3] = {0x3c00, 0xc000, 0x3555};  // 1, -2, ~1/3
  write_npy(path("h.npy"), NpyDType::kF16, {3}, h);
  const std::vector<float> f = read_npy(path("h.npy")).to_f32();
  EXPECT_EQ(f[0], 1.0f);
  EXPECT_EQ(f[1], -2.0f);
  EXPECT_NEAR(f[2], 1.0f / 3.0f, 1e-3f);

  const std::int64_t big[2] = {5, std::int64_t{1} << 40};
  write_npy(path("i.npy"), NpyDType::kI64, {2}, big);
  const NpyArray a = read_npy(path("i.npy"));
  EXPECT_THROW((void)a.to_i32("--page-table"), InvalidArgument);
  const std::int64_t ok[2] = {-1, 7};
  write_npy(path("j.npy"), NpyDType::kI64, {2}, ok);
  EXPECT_EQ(read_npy(path("j.npy")).to_i32("x"), (std::vector<std::int32_t>{-1, 7}));
  EXPECT_THROW((void)read_npy(path("h.npy")).to_i32("--cu-seqlens-q"), InvalidArgument);
}

TEST_F(NpyTest, MissingFile) { expect_io_error(path("does_not_exist.npy"), "cannot open"); }

TEST_F(NpyTest, WrongMagic) {
  std::string s = make_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4);
  s[1] = 'X';
  expect_io_error(write_raw("magic.npy", s), "wrong magic");
  expect_io_error(write_raw("tiny.npy", "\x93NUM"), "not a .npy file");
  expect_io_error(write_raw("empty.npy", ""), "not a .npy file");
}

TEST_F(NpyTest, UnsupportedVersion) {
  std::string s = make_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4);
  s[6] = 4;
  expect_io_error(write_raw("ver.npy", s), "version 4.0");
}

TEST_F(NpyTest, TruncatedHeader) {
  const std::string s = make_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", 4);
  expect_io_error(write_raw("th.npy", s.substr(0, 40)), "truncated header");
  expect_io_error(write_raw("th2.npy", s.substr(0, 9)), "truncated");
}

TEST_F(NpyTest, TruncatedDataAndHeaderLies) {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 4), }";
  expect_io_error(write_raw("short.npy", make_npy(1, dict, 60)), "truncated data");
  expect_io_error(write_raw("long.npy", make_npy(1, dict, 68)), "data size mismatch");
}

TEST_F(NpyTest, HugeDeclaredShapesAreRejectedBeforeAllocation) {
  expect_io_error(
      write_raw(
          "huge.npy",
          make_npy(
              1,
              "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776), }",
              16)),
      "truncated data");
  expect_io_error(
      write_raw(
          "huge2.npy",
          make_npy(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (9223372036854775807,), }",
                   16)),
      "truncated data");
  expect_io_error(
      write_raw(
          "ovf.npy",
          make_npy(1,
                   "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
                   16)),
      "overflows");
}

TEST_F(NpyTest, FortranOrder) {
  expect_io_error(
      write_raw("f.npy",
                make_npy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16)),
      "Fortran");
}

TEST_F(NpyTest, UnsupportedDtypes) {
  for (const std::string d : {"<f8", ">f4", "|i1", "<u2", "<c8", "|b1"}) {
    const std::string dict = "{'descr': '" + d + "', 'fortran_order': False, 'shape': (2,), }";
    expect_io_error(write_raw("d.npy", make_npy(1, dict, 16)), "unsupported dtype '" + d + "'");
  }
}

// Bytes (fp8 e4m3 bits for `--dtype fp8`): "|u1" as numpy writes uint8, "<u1" and "|V1".
TEST_F(NpyTest, ByteArrays) {
  for (const std::string d : {"|u1", "<u1", "|V1"}) {
    const std::string dict = "{'descr': '" + d + "', 'fortran_order': False, 'shape': (3, 2), }";
    const NpyArray a = read_npy(write_raw("b.npy", make_npy(1, dict, 6)));
    EXPECT_EQ(a.dtype, NpyDType::kU8) << d;
    EXPECT_EQ(a.itemsize(), 1u);
    EXPECT_FALSE(a.is_float());
    EXPECT_FALSE(a.is_index());
    ASSERT_EQ(a.data.size(), 6u);
    EXPECT_EQ(a.to_f32()[5], 1.0f);  // make_npy fills the data with 0x01
  }
  const std::vector<std::uint8_t> bytes{0x00, 0x38, 0x7e, 0xff};
  write_npy(path("w.npy"), NpyDType::kU8, {4}, bytes.data());
  const NpyArray w = read_npy(path("w.npy"));
  EXPECT_EQ(std::string(npy_descr(w.dtype)), "|u1");
  EXPECT_EQ(std::memcmp(w.data.data(), bytes.data(), 4), 0);
  expect_io_error(
      write_raw(
          "s.npy",
          make_npy(1, "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", 8)),
      "structured");
}

TEST_F(NpyTest, MalformedHeaderDicts) {
  for (const std::string dict :
       {"{'descr': '<f4', 'fortran_order': False}",
        "{'descr': '<f4', 'fortran_order': Flase, 'shape': (1,), }", "['descr', '<f4']",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}",
        "{'descr': '<f4, 'fortran_order': False, 'shape': (1,), }"}) {
    expect_io_error(write_raw("m.npy", make_npy(1, dict, 4)), "malformed .npy header");
  }
}

TEST_F(NpyTest, WriteToBadPathIsIoError) {
  const float x = 1.0f;
  EXPECT_THROW(write_npy(path("no_such_dir/x.npy"), NpyDType::kF32, {1}, &x), IoError);
}

// NpyFile: header without the data, partial reads, mappings (private: writes never
// reach the file); NpyOutput: mapped and buffered outputs read back by read_npy.
TEST_F(NpyTest, FileReadsAndMapsInPlace) {
  std::vector<float> vals(1000);
  for (std::size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i) * 0.5f;
  const std::string p = path("f.npy");
  write_npy(p, NpyDType::kF32, {10, 100}, vals.data());
  const NpyFile f(p);
  EXPECT_EQ(f.header().shape, (std::vector<std::int64_t>{10, 100}));
  EXPECT_EQ(f.data_bytes(), vals.size() * 4);
  std::vector<float> part(7);
  f.read(part.data(), 993, 7);
  EXPECT_EQ(part, std::vector<float>(vals.begin() + 993, vals.end()));
  EXPECT_THROW(f.read(part.data(), 994, 7), InvalidArgument);
  {
    const NpyMapping m = f.map(false);
    ASSERT_EQ(m.size(), vals.size() * 4);
    EXPECT_EQ(std::memcmp(m.data(), vals.data(), m.size()), 0);
  }
  {
    const NpyMapping m = f.map(true);
    const float poison = -1.0f;
    std::memcpy(m.data(), &poison, 4);  // copy-on-write
  }
  const NpyArray back = read_npy(p);
  EXPECT_EQ(std::memcmp(back.data.data(), vals.data(), back.data.size()), 0);
}

TEST_F(NpyTest, OutputWritesThroughTheFileAndRemovesItWithoutCommit) {
  const std::vector<std::vector<std::int64_t>> shapes = {{3, 5, 7}, {0, 4}, {}};
  for (const auto& shape : shapes) {
    const std::string p = path("o.npy");
    NpyOutput out(p, NpyDType::kF32, shape);
    const std::size_t n = out.data_bytes() / 4;
    auto* d = static_cast<float*>(out.data());
    for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<float>(i) + 0.25f;
    out.commit();
    const NpyArray a = read_npy(p);
    EXPECT_EQ(a.shape, shape);
    ASSERT_EQ(a.data.size(), n * 4);
    for (std::size_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, a.data.data() + 4 * i, 4);
      EXPECT_EQ(v, static_cast<float>(i) + 0.25f);
    }
  }
  const std::string p = path("abandoned.npy");
  { NpyOutput out(p, NpyDType::kF32, {4}); }
  EXPECT_FALSE(std::filesystem::exists(p));
  // An existing file is left as it was by an abandoned output, and replaced on commit
  // even while it is mapped as an input (the mapping keeps the old contents).
  const float old_vals[2] = {1.0f, 2.0f};
  write_npy(p, NpyDType::kF32, {2}, old_vals);
  { NpyOutput out(p, NpyDType::kF32, {3}); }
  EXPECT_EQ(read_npy(p).shape, std::vector<std::int64_t>{2});
  {
    const NpyFile in(p);
    const NpyMapping m = in.map(false);
    NpyOutput out(p, NpyDType::kF32, {2});
    static_cast<float*>(out.data())[0] = 5.0f;
    static_cast<float*>(out.data())[1] = 6.0f;
    out.commit();
    float seen[2];
    std::memcpy(seen, m.data(), 8);
    EXPECT_EQ(seen[0], 1.0f);
    EXPECT_EQ(seen[1], 2.0f);
  }
  const NpyArray replaced = read_npy(p);
  float now[2];
  std::memcpy(now, replaced.data.data(), 8);
  EXPECT_EQ(now[0], 5.0f);
  EXPECT_EQ(now[1], 6.0f);
  std::size_t files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 2u);  // o.npy and abandoned.npy: no temporary file left behind
  EXPECT_THROW(NpyOutput(path("no_such_dir/x.npy"), NpyDType::kF32, {1}), IoError);
  // A non-regular file gets a buffer written by commit().
  NpyOutput null_out("/dev/null", NpyDType::kF32, {2, 2});
  static_cast<float*>(null_out.data())[3] = 1.0f;
  null_out.commit();
  EXPECT_TRUE(std::filesystem::exists("/dev/null"));
}

}  // namespace
}  // namespace ringattn
