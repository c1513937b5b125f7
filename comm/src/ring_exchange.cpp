#include "ringattn/comm/ring_exchange.hpp"

#include <climits>

#include "ringattn/comm/mpi_check.hpp"

namespace ringattn::comm {

RingExchange::RingExchange(const Communicator& comm, std::size_t max_bytes, int tag)
    : comm_(comm), max_bytes_(max_bytes) {
  RA_CHECK_ARG_LE(max_bytes, static_cast<std::size_t>(INT_MAX),
                  "ring exchange: block larger than one MPI message (bytes)");
  for (auto& b : buffers_) b.resize(max_bytes == 0 ? 1 : max_bytes);
  const int count = static_cast<int>(max_bytes);
  for (int i = 0; i < 2; ++i) {
    RA_MPI_CHECK(MPI_Send_init(buffers_[i].data(), count, MPI_BYTE, comm.right(), tag, comm.get(),
                               &send_[i]));
    RA_MPI_CHECK(MPI_Recv_init(buffers_[i].data(), count, MPI_BYTE, comm.left(), tag, comm.get(),
                               &recv_[i]));
  }
}

RingExchange::~RingExchange() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (active_) MPI_Waitall(2, active_reqs_, MPI_STATUSES_IGNORE);
  for (int i = 0; i < 2; ++i) {
    if (send_[i] != MPI_REQUEST_NULL) MPI_Request_free(&send_[i]);
    if (recv_[i] != MPI_REQUEST_NULL) MPI_Request_free(&recv_[i]);
  }
}

void RingExchange::start() {
  RA_CHECK(!active_, CommError, "ring exchange: start() while a transfer is in flight");
  active_reqs_[0] = recv_[1 - cur_];
  active_reqs_[1] = send_[cur_];
  // Receive first so the incoming message finds its buffer posted.
  RA_MPI_CHECK(MPI_Startall(2, active_reqs_));
  active_ = true;
  done_ = false;
}

bool RingExchange::progress() {
  if (!active_ || done_) return true;
  int flag = 0;
  RA_MPI_CHECK(MPI_Testall(2, active_reqs_, &flag, MPI_STATUSES_IGNORE));
  done_ = flag != 0;
  return done_;
}

void RingExchange::finish() {
  RA_CHECK(active_, CommError, "ring exchange: finish() without start()");
  if (!done_) RA_MPI_CHECK(MPI_Waitall(2, active_reqs_, MPI_STATUSES_IGNORE));
  active_ = false;
  done_ = false;
  cur_ = 1 - cur_;
}

}  // namespace ringattn::comm
