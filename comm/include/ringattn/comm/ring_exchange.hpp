// Double-buffered ring exchange: every rank passes the block it holds to its right
// neighbour and receives the next one from its left neighbour, while it computes
// on the block in hand.
//
//   step t:  start()  -> post Irecv(next <- left), Isend(current -> right)
//            ...compute on current(), calling progress() now and then...
//            finish() -> wait both, swap buffers: next becomes current
//
//   rank:        0      1      2      3          (P = 4, block X_r starts on rank r)
//   step 0 holds X0     X1     X2     X3
//   step 1 holds X3     X0     X1     X2
//   step 2 holds X2     X3     X0     X1
//   step 3 holds X1     X2     X3     X0         P-1 exchanges of max_bytes each
//
// The four requests (send/recv on each of the two buffers) are persistent
// (MPI_Send_init / MPI_Recv_init), created once and restarted each step. Every send
// carries the full `max_bytes` buffer so the persistent requests never change; the
// caller sizes blocks up to max_bytes and knows each block's real length.
//
// Open MPI moves a large message (shared memory single copy, TCP) only while some
// MPI call runs on the receiving and sending side. progress() is an MPI_Testall on
// the two active requests: calling it between pieces of compute lets the transfer
// proceed under the compute instead of inside finish().
#pragma once

#include <mpi.h>

#include <cstddef>
#include <vector>

#include "ringattn/comm/communicator.hpp"

namespace ringattn::comm {

class RingExchange {
 public:
  RingExchange(const Communicator& comm, std::size_t max_bytes, int tag = 0x7a11);
  ~RingExchange();
  RingExchange(const RingExchange&) = delete;
  RingExchange& operator=(const RingExchange&) = delete;

  std::size_t max_bytes() const { return max_bytes_; }
  // The block in hand (max_bytes long). Fill it before the first start().
  std::byte* current() { return buffers_[cur_].data(); }
  const std::byte* current() const { return buffers_[cur_].data(); }

  // Posts receive of the next block and send of the current one.
  void start();
  // Drives the transfer; returns true once both requests are complete.
  bool progress();
  // Waits for both requests, then makes the received block current.
  void finish();
  bool active() const { return active_; }

 private:
  const Communicator& comm_;
  std::size_t max_bytes_;
  std::vector<std::byte> buffers_[2];
  MPI_Request send_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  MPI_Request recv_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  MPI_Request active_reqs_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  int cur_ = 0;
  bool active_ = false;
  bool done_ = false;
};

}  // namespace ringattn::comm
