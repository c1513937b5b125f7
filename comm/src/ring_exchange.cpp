#include "ringattn/comm/ring_exchange.hpp"

#include <climits>
#include <new>

#include "ringattn/comm/mpi_check.hpp"

namespace ringattn::comm {

namespace {

// Free exchange buffers kept for the next ring call: two exchanges of three buffers
// (pass-Q runs two).
BufferPool& exchange_pool() {
  static BufferPool pool(6);
  return pool;
}

}  // namespace

RingExchange::RingExchange(const Communicator& comm, std::size_t max_bytes, int tag)
    : max_bytes_(max_bytes) {
  RA_CHECK_ARG_LE(max_bytes, static_cast<std::size_t>(INT_MAX),
                  "ring exchange: block larger than one MPI message (bytes)");
  for (int i = 0; i < kBuffers; ++i)
    if (!BufferPool::take(&exchange_pool(), max_bytes, buffers_[i])) throw std::bad_alloc();
  const int count = static_cast<int>(max_bytes);
  for (int i = 0; i < kBuffers; ++i) {
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
  if (active_ && !recv_done_) MPI_Wait(&recv_[next()], MPI_STATUS_IGNORE);
  for (int i = 0; i < kBuffers; ++i)
    if (send_active_[i]) MPI_Wait(&send_[i], MPI_STATUS_IGNORE);
  for (int i = 0; i < kBuffers; ++i) {
    if (send_[i] != MPI_REQUEST_NULL) MPI_Request_free(&send_[i]);
    if (recv_[i] != MPI_REQUEST_NULL) MPI_Request_free(&recv_[i]);
  }
}

void RingExchange::start() {
  RA_CHECK(!active_, CommError, "ring exchange: start() while a receive is in flight");
  const int nx = next();
  // The buffer we receive into was sent from two steps ago: that send must be done.
  if (send_active_[nx]) {
    RA_MPI_CHECK(MPI_Wait(&send_[nx], MPI_STATUS_IGNORE));
    send_active_[nx] = false;
  }
  // Receive first so the incoming message finds its buffer posted.
  RA_MPI_CHECK(MPI_Start(&recv_[nx]));
  RA_MPI_CHECK(MPI_Start(&send_[cur_]));
  send_active_[cur_] = true;
  active_ = true;
  recv_done_ = false;
}

bool RingExchange::progress() {
  if (!active_) return true;
  int flag = 0;
  if (!recv_done_) {
    RA_MPI_CHECK(MPI_Test(&recv_[next()], &flag, MPI_STATUS_IGNORE));
    recv_done_ = flag != 0;
  }
  for (int i = 0; i < kBuffers; ++i)
    if (send_active_[i]) {
      RA_MPI_CHECK(MPI_Test(&send_[i], &flag, MPI_STATUS_IGNORE));
      send_active_[i] = flag == 0;
    }
  return recv_done_ && !send_active_[cur_];
}

void RingExchange::finish() {
  RA_CHECK(active_, CommError, "ring exchange: finish() without start()");
  if (!recv_done_) RA_MPI_CHECK(MPI_Wait(&recv_[next()], MPI_STATUS_IGNORE));
  // Let the send move on without waiting for it.
  if (send_active_[cur_]) {
    int flag = 0;
    RA_MPI_CHECK(MPI_Test(&send_[cur_], &flag, MPI_STATUS_IGNORE));
    send_active_[cur_] = flag == 0;
  }
  active_ = false;
  recv_done_ = false;
  cur_ = next();
}

}  // namespace ringattn::comm
