// Collectives ringattn needs on top of plain MPI (no attention knowledge here):
//  - agree_on_error: turn "some rank failed" into the same exception on every rank,
//  - check_consistent: all ranks hold the same configuration (shapes, dtypes, options,
//    library version) before any data moves,
//  - scatter_rows / gather_rows: move the rows a rank owns (any layout, described as
//    strided row spans) between a root holding the whole tensor and the owners,
//  - exchange_blocks: all-to-all of individually placed blocks,
//  - UserOp + allreduce / reduce with a user-defined operation (e.g. the LSE merge).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "ringattn/comm/communicator.hpp"

namespace ringattn::comm {

// Collective. Every rank passes the exception it caught (or nullptr). When any rank
// failed, every rank throws the same exception type with the message of the lowest
// failing rank, prefixed "rank R: ". Never deadlocks: it is a fixed sequence of
// collectives that every rank enters whether it failed or not.
void agree_on_error(const Communicator& comm, std::exception_ptr error);

// Runs `fn` on every rank and agrees on its outcome as above.
template <class Fn>
void run_collectively(const Communicator& comm, Fn&& fn) {
  std::exception_ptr error;
  try {
    std::forward<Fn>(fn)();
  } catch (...) {
    error = std::current_exception();
  }
  agree_on_error(comm, error);
}

// Collective. Each rank describes its configuration as ordered (name, value) fields;
// all ranks must give identical lists. A mismatch throws CommError on every rank,
// naming the first field that differs and the two values, e.g.
//   "ranks disagree on 'seqlen': rank 0 has 4096, rank 2 has 4095".
using Fields = std::vector<std::pair<std::string, std::string>>;
void check_consistent(const Communicator& comm, const Fields& fields);

// A set of rows of a row-major tensor: rows start, start + stride, ... (count rows).
struct RowSpan {
  std::int64_t start = 0;
  std::int64_t count = 0;
  std::int64_t stride = 1;
};
using RowSpans = std::vector<RowSpan>;  // a rank's rows, in its local order
// Spans owned by a given rank.
using SpansOf = std::function<RowSpans(int rank)>;

std::int64_t total_rows(const RowSpans& spans);

// Collective. Root holds the whole tensor `global` (rows of row_bytes bytes); every
// rank receives the rows spans_of(rank) into `local` (packed in span order). Only
// one rank's rows are packed on the root at a time (extra memory O(local)).
void scatter_rows(const Communicator& comm, int root, const void* global, std::size_t row_bytes,
                  const SpansOf& spans_of, void* local);

// Collective. Inverse of scatter_rows: rows from every rank land at their positions
// in `global` on the root (ignored elsewhere).
void gather_rows(const Communicator& comm, int root, const void* local, std::size_t row_bytes,
                 const SpansOf& spans_of, void* global);

// One block of an exchange: `bytes` bytes at `data`, sent to or received from `peer`.
struct PeerBlock {
  int peer = 0;
  void* data = nullptr;  // only read for a send
  std::size_t bytes = 0;
};

// Point-to-point exchange of described blocks, e.g. an all-to-all whose blocks land
// directly in their final places (no packed receive buffer to unpack). Posts every
// receive, then every send (a block over 1 GiB as several messages), runs `overlap`
// (work that needs none of the blocks, e.g. the caller's local copies), and waits for
// all. Blocks between two ranks pair up in list order: the i-th block that rank a
// sends to b is the i-th block that b receives from a, with the same size. Zero-byte
// blocks are skipped on both sides; a block to or from the calling rank itself is an
// InvalidArgument (copy it locally). `overlap` must not throw: the blocks are in use
// until the wait.
void exchange_blocks(const Communicator& comm, const std::vector<PeerBlock>& sends,
                     const std::vector<PeerBlock>& recvs,
                     const std::function<void()>& overlap = {});

// Broadcast of `bytes` bytes (any size) from root.
void broadcast_bytes(const Communicator& comm, int root, void* data, std::size_t bytes);

// A user-defined, commutative MPI reduction operation (MPI_Op_create), freed on
// destruction. `fn` has MPI's signature: combine `len` elements of `type` from
// `in` into `inout`.
class UserOp {
 public:
  explicit UserOp(MPI_User_function* fn, bool commutative = true);
  ~UserOp();
  UserOp(const UserOp&) = delete;
  UserOp& operator=(const UserOp&) = delete;
  MPI_Op get() const { return op_; }

 private:
  MPI_Op op_ = MPI_OP_NULL;
};

// A contiguous datatype of `n` floats (one reduction element), freed on destruction.
class FloatRecordType {
 public:
  explicit FloatRecordType(int n);
  ~FloatRecordType();
  FloatRecordType(const FloatRecordType&) = delete;
  FloatRecordType& operator=(const FloatRecordType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// In-place allreduce of `count` elements of `type` with `op`.
void allreduce(const Communicator& comm, void* data, int count, MPI_Datatype type, MPI_Op op);
// In-place reduce to root (data on other ranks is scratch afterwards).
void reduce(const Communicator& comm, int root, void* data, int count, MPI_Datatype type,
            MPI_Op op);

}  // namespace ringattn::comm
