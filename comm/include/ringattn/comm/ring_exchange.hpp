// Ring exchange: every rank passes the block it holds to its right neighbour and
// receives the next one from its left neighbour, while it computes on the block in
// hand.
//
//   step t:  start()  -> post Irecv(next <- left), Isend(current -> right)
//            ...compute on current(), calling progress() now and then...
//            finish() -> wait for the receive; next becomes current
//
// Three buffers rotate (in hand, being received, still being sent), so finish()
// waits only for the block coming from the left: the send of step t may complete
// during step t+1 (start() of step t+2 waits for it before receiving into its
// buffer). A rank is then held up only by a late left neighbour, not also by a
// right neighbour that has not yet picked up its block.
//
//   rank:        0      1      2      3          (P = 4, block X_r starts on rank r)
//   step 0 holds X0     X1     X2     X3
//   step 1 holds X3     X0     X1     X2
//   step 2 holds X2     X3     X0     X1
//   step 3 holds X1     X2     X3     X0         P-1 exchanges of max_bytes each
//
// The six requests (send/recv on each of the three buffers) are persistent
// (MPI_Send_init / MPI_Recv_init), created once and restarted each step. Every send
// carries the full `max_bytes` buffer so the persistent requests never change; the
// caller sizes blocks up to max_bytes and knows each block's real length.
//
// Open MPI moves a large message (shared memory single copy, TCP) only while some
// MPI call runs on the receiving and sending side. progress() tests the active
// requests: calling it between pieces of compute lets the transfer proceed under
// the compute instead of inside finish().
#pragma once

#include <mpi.h>

#include <cstddef>

#include "ringattn/buffer_pool.hpp"
#include "ringattn/comm/communicator.hpp"

namespace ringattn::comm {

class RingExchange {
 public:
  RingExchange(const Communicator& comm, std::size_t max_bytes, int tag = 0x7a11);
  ~RingExchange();
  RingExchange(const RingExchange&) = delete;
  RingExchange& operator=(const RingExchange&) = delete;

  std::size_t max_bytes() const { return max_bytes_; }
  // The block in hand (max_bytes long). Fill it before the first start(); it must
  // not be written while a transfer started from it may be in flight (until the
  // next-but-one start()).
  std::byte* current() { return static_cast<std::byte*>(buffers_[cur_].data()); }
  const std::byte* current() const { return static_cast<const std::byte*>(buffers_[cur_].data()); }

  // Posts receive of the next block and send of the current one.
  void start();
  // Drives the transfers; returns true once this step's receive and send are done.
  bool progress();
  // Waits for the receive, then makes the received block current (the send may
  // still be in flight).
  void finish();
  bool active() const { return active_; }

 private:
  std::size_t max_bytes_;
  static constexpr int kBuffers = 3;
  int next() const { return (cur_ + 1) % kBuffers; }
  // Taken from (and given back to, after the requests are freed) a process-wide
  // BufferPool: ring calls repeat (every layer, every iteration), and fresh buffers of
  // tens of MB would pay page faults and zeroing on every call. Contents start
  // unspecified.
  BufferPool::Lease buffers_[kBuffers];
  MPI_Request send_[kBuffers] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  MPI_Request recv_[kBuffers] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  bool send_active_[kBuffers] = {false, false, false};
  int cur_ = 0;
  bool active_ = false;     // a receive is in flight (start() without finish())
  bool recv_done_ = false;  // ... and it has completed
};

}  // namespace ringattn::comm
