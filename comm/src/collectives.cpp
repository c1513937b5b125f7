#include "ringattn/comm/collectives.hpp"

#include <algorithm>
#include <cstring>
#include <new>

#include "ringattn/comm/mpi_check.hpp"

namespace ringattn::comm {

namespace {

// Exception kinds that travel between ranks (so that every rank rethrows the type
// the failing rank saw, and the CLI exits with the same code everywhere).
enum ErrorKind : int {
  kGeneric = 0,
  kInvalidArgument,
  kUnsupported,
  kIo,
  kComm,
  kResource,
};

struct Described {
  int kind = kGeneric;
  std::string message;   // without the "(file:line)" suffix
  std::string location;  // "file.cpp:123", may be empty
};

Described describe(const std::exception_ptr& error) {
  Described d;
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    if (dynamic_cast<const InvalidArgument*>(&e)) d.kind = kInvalidArgument;
    if (dynamic_cast<const UnsupportedError*>(&e)) d.kind = kUnsupported;
    if (dynamic_cast<const IoError*>(&e)) d.kind = kIo;
    if (dynamic_cast<const CommError*>(&e)) d.kind = kComm;
    if (dynamic_cast<const ResourceError*>(&e)) d.kind = kResource;
    d.message = e.message();
    const std::string what = e.what();
    // what() == message + " (" + location + ")"
    if (what.size() > d.message.size() + 3)
      d.location = what.substr(d.message.size() + 2, what.size() - d.message.size() - 3);
  } catch (const std::bad_alloc&) {
    d.kind = kResource;
    d.message = "out of memory";
  } catch (const std::exception& e) {
    d.message = e.what();
  } catch (...) {
    d.message = "unknown exception";
  }
  return d;
}

[[noreturn]] void throw_described(int kind, const std::string& message,
                                  const std::string& location) {
  std::string file = location;
  int line = 0;
  const auto colon = location.find_last_of(':');
  if (colon != std::string::npos) {
    file = location.substr(0, colon);
    line = std::atoi(location.c_str() + colon + 1);
  }
  const char* f = file.c_str();
  switch (kind) {
    case kInvalidArgument:
      throw InvalidArgument(message, f, line);
    case kUnsupported:
      throw UnsupportedError(message, f, line);
    case kIo:
      throw IoError(message, f, line);
    case kComm:
      throw CommError(message, f, line);
    case kResource:
      throw ResourceError(message, f, line);
    default:
      throw Error(message, f, line);
  }
}

constexpr std::size_t kMaxMessageBytes = std::size_t{1} << 30;

void send_bytes(const Communicator& comm, int dest, int tag, const std::byte* p, std::size_t n) {
  do {
    const std::size_t piece = std::min(n, kMaxMessageBytes);
    RA_MPI_CHECK(MPI_Send(p, static_cast<int>(piece), MPI_BYTE, dest, tag, comm.get()));
    p += piece;
    n -= piece;
  } while (n > 0);
}

void recv_bytes(const Communicator& comm, int src, int tag, std::byte* p, std::size_t n) {
  do {
    const std::size_t piece = std::min(n, kMaxMessageBytes);
    RA_MPI_CHECK(
        MPI_Recv(p, static_cast<int>(piece), MPI_BYTE, src, tag, comm.get(), MPI_STATUS_IGNORE));
    p += piece;
    n -= piece;
  } while (n > 0);
}

// Copies the rows of `spans` between a packed buffer and the global tensor.
template <bool kToPacked>
void copy_spans(const RowSpans& spans, std::size_t row_bytes, std::byte* global,
                std::byte* packed) {
  for (const auto& s : spans) {
    for (std::int64_t i = 0; i < s.count; ++i) {
      std::byte* g = global + static_cast<std::size_t>(s.start + i * s.stride) * row_bytes;
      if constexpr (kToPacked) {
        std::memcpy(packed, g, row_bytes);
      } else {
        std::memcpy(g, packed, row_bytes);
      }
      packed += row_bytes;
    }
  }
}

constexpr int kScatterTag = 0x7a21;
constexpr int kGatherTag = 0x7a22;

}  // namespace

void agree_on_error(const Communicator& comm, std::exception_ptr error) {
  // Step 1: lowest failing rank (size when none failed).
  int mine = error ? comm.rank() : comm.size();
  int first = comm.size();
  RA_MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm.get()));
  if (first == comm.size()) return;
  // Step 2: that rank broadcasts kind, message and location.
  Described d;
  if (comm.rank() == first) {
    d = describe(error);
    d.message = "rank " + std::to_string(first) + ": " + d.message;
  }
  std::int64_t header[3] = {d.kind, static_cast<std::int64_t>(d.message.size()),
                            static_cast<std::int64_t>(d.location.size())};
  RA_MPI_CHECK(MPI_Bcast(header, 3, MPI_INT64_T, first, comm.get()));
  d.kind = static_cast<int>(header[0]);
  d.message.resize(static_cast<std::size_t>(header[1]));
  d.location.resize(static_cast<std::size_t>(header[2]));
  broadcast_bytes(comm, first, d.message.data(), d.message.size());
  broadcast_bytes(comm, first, d.location.data(), d.location.size());
  throw_described(d.kind, d.message, d.location);
}

void check_consistent(const Communicator& comm, const Fields& fields) {
  // Serialise as "name=value\n" lines; compare every rank's text with rank 0's.
  std::string mine;
  for (const auto& [name, value] : fields) mine += name + "=" + value + "\n";
  std::int64_t len = static_cast<std::int64_t>(mine.size());
  std::vector<std::int64_t> lens(static_cast<std::size_t>(comm.size()));
  RA_MPI_CHECK(MPI_Allgather(&len, 1, MPI_INT64_T, lens.data(), 1, MPI_INT64_T, comm.get()));
  std::string root_text(static_cast<std::size_t>(lens[0]), '\0');
  if (comm.rank() == 0) root_text = mine;
  broadcast_bytes(comm, 0, root_text.data(), root_text.size());
  // Each rank finds its own first difference; ranks then agree on the lowest one.
  std::exception_ptr error;
  if (root_text != mine) {
    const auto split = [](const std::string& text) {
      Fields out;
      std::size_t pos = 0;
      while (pos < text.size()) {
        const auto nl = text.find('\n', pos);
        const auto line = text.substr(pos, nl - pos);
        const auto eq = line.find('=');
        out.emplace_back(line.substr(0, eq), eq == std::string::npos ? "" : line.substr(eq + 1));
        pos = nl == std::string::npos ? text.size() : nl + 1;
      }
      return out;
    };
    const Fields root_fields = split(root_text);
    std::string msg;
    const std::size_t n = std::max(root_fields.size(), fields.size());
    for (std::size_t i = 0; i < n && msg.empty(); ++i) {
      const std::string rn = i < root_fields.size() ? root_fields[i].first : "<none>";
      const std::string mn = i < fields.size() ? fields[i].first : "<none>";
      const std::string rv = i < root_fields.size() ? root_fields[i].second : "<none>";
      const std::string mv = i < fields.size() ? fields[i].second : "<none>";
      if (rn != mn) {
        msg = "ranks disagree on the configuration: rank 0 has field '" + rn + "', rank " +
              std::to_string(comm.rank()) + " has '" + mn + "'";
      } else if (rv != mv) {
        msg = "ranks disagree on '" + rn + "': rank 0 has " + rv + ", rank " +
              std::to_string(comm.rank()) + " has " + mv;
      }
    }
    try {
      RA_THROW(CommError, msg);
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree_on_error(comm, error);
}

std::int64_t total_rows(const RowSpans& spans) {
  std::int64_t n = 0;
  for (const auto& s : spans) n += s.count;
  return n;
}

void scatter_rows(const Communicator& comm, int root, const void* global, std::size_t row_bytes,
                  const SpansOf& spans_of, void* local) {
  auto* g = static_cast<std::byte*>(const_cast<void*>(global));
  if (comm.rank() != root) {
    const auto rows = total_rows(spans_of(comm.rank()));
    recv_bytes(comm, root, kScatterTag, static_cast<std::byte*>(local),
               static_cast<std::size_t>(rows) * row_bytes);
    return;
  }
  std::vector<std::byte> packed;
  for (int r = 0; r < comm.size(); ++r) {
    const RowSpans spans = spans_of(r);
    const auto bytes = static_cast<std::size_t>(total_rows(spans)) * row_bytes;
    if (r == root) {
      copy_spans<true>(spans, row_bytes, g, static_cast<std::byte*>(local));
      continue;
    }
    packed.resize(bytes);
    copy_spans<true>(spans, row_bytes, g, packed.data());
    send_bytes(comm, r, kScatterTag, packed.data(), bytes);
  }
}

void gather_rows(const Communicator& comm, int root, const void* local, std::size_t row_bytes,
                 const SpansOf& spans_of, void* global) {
  auto* l = static_cast<std::byte*>(const_cast<void*>(local));
  if (comm.rank() != root) {
    const auto rows = total_rows(spans_of(comm.rank()));
    send_bytes(comm, root, kGatherTag, l, static_cast<std::size_t>(rows) * row_bytes);
    return;
  }
  std::vector<std::byte> packed;
  for (int r = 0; r < comm.size(); ++r) {
    const RowSpans spans = spans_of(r);
    const auto bytes = static_cast<std::size_t>(total_rows(spans)) * row_bytes;
    if (r == root) {
      copy_spans<false>(spans, row_bytes, static_cast<std::byte*>(global), l);
      continue;
    }
    packed.resize(bytes);
    recv_bytes(comm, r, kGatherTag, packed.data(), bytes);
    copy_spans<false>(spans, row_bytes, static_cast<std::byte*>(global), packed.data());
  }
}

void exchange_blocks(const Communicator& comm, const std::vector<PeerBlock>& sends,
                     const std::vector<PeerBlock>& recvs, const std::function<void()>& overlap) {
  const int rank = comm.rank(), ranks = comm.size();
  for (const auto* list : {&recvs, &sends}) {
    for (const auto& blk : *list) {
      RA_CHECK_ARG(blk.peer >= 0 && blk.peer < ranks && blk.peer != rank,
                   "exchange_blocks: peer " << blk.peer << " of rank " << rank << " (" << ranks
                                            << " ranks; blocks to self are copied locally)");
    }
  }
  // Receives first, so that a sender's rendezvous finds its receive posted; one tag
  // for all (MPI keeps the order of messages between two ranks on one tag).
  std::vector<MPI_Request> reqs;
  auto post = [&](const PeerBlock& blk, bool is_send) {
    auto* p = static_cast<std::byte*>(blk.data);
    for (std::size_t off = 0; off < blk.bytes; off += kMaxMessageBytes) {
      const int n = static_cast<int>(std::min(blk.bytes - off, kMaxMessageBytes));
      reqs.emplace_back();
      if (is_send) {
        RA_MPI_CHECK(MPI_Isend(p + off, n, MPI_BYTE, blk.peer, 0, comm.get(), &reqs.back()));
      } else {
        RA_MPI_CHECK(MPI_Irecv(p + off, n, MPI_BYTE, blk.peer, 0, comm.get(), &reqs.back()));
      }
    }
  };
  for (const auto& blk : recvs) post(blk, false);
  for (const auto& blk : sends) post(blk, true);
  if (overlap) overlap();
  RA_MPI_CHECK(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE));
}

void broadcast_bytes(const Communicator& comm, int root, void* data, std::size_t bytes) {
  auto* p = static_cast<std::byte*>(data);
  while (bytes > 0) {
    const std::size_t piece = std::min(bytes, kMaxMessageBytes);
    RA_MPI_CHECK(MPI_Bcast(p, static_cast<int>(piece), MPI_BYTE, root, comm.get()));
    p += piece;
    bytes -= piece;
  }
}

UserOp::UserOp(MPI_User_function* fn, bool commutative) {
  RA_MPI_CHECK(MPI_Op_create(fn, commutative ? 1 : 0, &op_));
}

UserOp::~UserOp() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && op_ != MPI_OP_NULL) MPI_Op_free(&op_);
}

FloatRecordType::FloatRecordType(int n) {
  RA_CHECK_ARG_GT(n, 0, "record type: float count");
  RA_MPI_CHECK(MPI_Type_contiguous(n, MPI_FLOAT, &type_));
  RA_MPI_CHECK(MPI_Type_commit(&type_));
}

FloatRecordType::~FloatRecordType() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && type_ != MPI_DATATYPE_NULL) MPI_Type_free(&type_);
}

void allreduce(const Communicator& comm, void* data, int count, MPI_Datatype type, MPI_Op op) {
  RA_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, data, count, type, op, comm.get()));
}

void reduce(const Communicator& comm, int root, void* data, int count, MPI_Datatype type,
            MPI_Op op) {
  if (comm.rank() == root) {
    RA_MPI_CHECK(MPI_Reduce(MPI_IN_PLACE, data, count, type, op, root, comm.get()));
  } else {
    RA_MPI_CHECK(MPI_Reduce(data, nullptr, count, type, op, root, comm.get()));
  }
}

}  // namespace ringattn::comm
