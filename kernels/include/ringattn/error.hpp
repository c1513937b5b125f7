// The one exception hierarchy of ringattn. Every layer (kernels, comm, src, CLI)
// reports failures by throwing one of these; messages carry file:line of the check
// that failed and, for argument checks, the values that were compared.
//
//   Error                 base; what() = "<message> (file.cpp:123)"
//   ├─ InvalidArgument    caller passed a bad shape, stride, index or option
//   ├─ UnsupportedError   valid request this build/machine/backend cannot run
//   ├─ IoError            file missing, unreadable or malformed (.npy reader)
//   ├─ CommError          MPI call failed or ranks disagree
//   └─ ResourceError      allocation failure / out of memory
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace ringattn {

class Error : public std::runtime_error {
 public:
  Error(const std::string& message, const char* file, int line)
      : std::runtime_error(format(message, file, line)), message_(message) {}
  // The message without the "(file:line)" suffix.
  const std::string& message() const noexcept { return message_; }

 private:
  static std::string format(const std::string& message, const char* file, int line) {
    std::string f = file ? file : "?";
    const auto slash = f.find_last_of('/');
    if (slash != std::string::npos) f = f.substr(slash + 1);
    return message + " (" + f + ":" + std::to_string(line) + ")";
  }
  std::string message_;
};

#define RINGATTN_DECLARE_ERROR(Name)                                                             \
  class Name : public Error {                                                                    \
   public:                                                                                       \
    Name(const std::string& message, const char* file, int line) : Error(message, file, line) {} \
  }

RINGATTN_DECLARE_ERROR(InvalidArgument);
RINGATTN_DECLARE_ERROR(UnsupportedError);
RINGATTN_DECLARE_ERROR(IoError);
RINGATTN_DECLARE_ERROR(CommError);
RINGATTN_DECLARE_ERROR(ResourceError);

#undef RINGATTN_DECLARE_ERROR

}  // namespace ringattn

// RA_THROW(InvalidArgument, "q: head dim " << d << " > 256");
#define RA_THROW(Type, stream_expr)                            \
  do {                                                         \
    std::ostringstream ra_oss_;                                \
    ra_oss_ << stream_expr;                                    \
    throw ::ringattn::Type(ra_oss_.str(), __FILE__, __LINE__); \
  } while (0)

// RA_CHECK(cond, InvalidArgument, "message " << value);
#define RA_CHECK(cond, Type, stream_expr)     \
  do {                                        \
    if (!(cond)) RA_THROW(Type, stream_expr); \
  } while (0)

// Argument checks that print both compared values, e.g.
//   RA_CHECK_ARG_EQ(p.d, k_dim, "k: last dim must equal q's head dim");
//   -> "k: last dim must equal q's head dim: expected p.d == k_dim, got 128 vs 64"
#define RA_CHECK_ARG_OP_(a, b, op, what)                                                      \
  do {                                                                                        \
    const auto& ra_a_ = (a);                                                                  \
    const auto& ra_b_ = (b);                                                                  \
    if (!(ra_a_ op ra_b_))                                                                    \
      RA_THROW(InvalidArgument,                                                               \
               what << ": expected " #a " " #op " " #b ", got " << ra_a_ << " vs " << ra_b_); \
  } while (0)

#define RA_CHECK_ARG_EQ(a, b, what) RA_CHECK_ARG_OP_(a, b, ==, what)
#define RA_CHECK_ARG_NE(a, b, what) RA_CHECK_ARG_OP_(a, b, !=, what)
#define RA_CHECK_ARG_LT(a, b, what) RA_CHECK_ARG_OP_(a, b, <, what)
#define RA_CHECK_ARG_LE(a, b, what) RA_CHECK_ARG_OP_(a, b, <=, what)
#define RA_CHECK_ARG_GT(a, b, what) RA_CHECK_ARG_OP_(a, b, >, what)
#define RA_CHECK_ARG_GE(a, b, what) RA_CHECK_ARG_OP_(a, b, >=, what)
#define RA_CHECK_ARG(cond, stream_expr) RA_CHECK(cond, InvalidArgument, stream_expr)
