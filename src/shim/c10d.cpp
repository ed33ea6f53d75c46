// C entry points to c10d, which tch does not bind (docs/design.md §8): a TCPStore for the
// rendezvous, a Gloo process group per ring generation, and its collectives started without
// waiting, so the caller can give up on them when its generation ends. Tensors arrive as tch's
// handles (pointers to at::Tensor); an error comes back as a message, never as an exception across
// the language boundary.
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

struct multipos_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct multipos_group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

struct multipos_work {
  c10::intrusive_ptr<c10d::Work> work;
  at::Tensor output;
};

namespace {
// c10d's flight recorder (a debugging trace of collectives, on by default) records every Gloo
// collective into a process-wide map that it writes before taking its lock: two groups starting
// collectives on two threads at once corrupt it (seen as a SIGSEGV in
// FlightRecorder::recordWithResetEnabled). It is switched off before the first group exists,
// while the program is still starting on one thread; its settings are read once, when first used.
const bool flight_recorder_off = [] { return setenv("TORCH_FR_BUFFER_SIZE", "0", 1) == 0; }();

void say(const char* what, char* error, size_t error_len) {
  if (error_len > 0) {
    std::strncpy(error, what, error_len - 1);
    error[error_len - 1] = '\0';
  }
}

template <typename F>
int guarded(char* error, size_t error_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    say(e.what(), error, error_len);
    return 1;
  }
}
}  // namespace

// A TCPStore server on the listening socket `fd` (bound by the caller, so it listens only where
// the caller chose), reachable as host:port. It takes the socket over.
extern "C" int multipos_store_serve(int fd, const char* host, uint16_t port, int64_t timeout_ms,
                                    multipos_store** out, char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = true;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    opts.masterListenFd = fd;
    *out = new multipos_store{c10::make_intrusive<c10d::TCPStore>(host, opts)};
  });
}

extern "C" void multipos_store_free(multipos_store* store) { delete store; }

// Joins a Gloo group of `size` ranks as `rank`: rendezvous through the TCPStore at host:port
// under `prefix`, Gloo's connections on the address of `device_host` (or on the network
// interface `device_interface` when it is not empty). Blocks until every rank joined or
// `timeout_ms` passed; every collective of the group is bounded by the same timeout.
extern "C" int multipos_gloo_group(const char* host, uint16_t port, const char* prefix, int rank,
                                   int size, int64_t timeout_ms, const char* device_host,
                                   const char* device_interface, multipos_group** out,
                                   char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = false;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::PrefixStore>(
        prefix, c10::make_intrusive<c10d::TCPStore>(host, opts));
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(
        std::strlen(device_interface) > 0
            ? c10d::ProcessGroupGloo::createDeviceForInterface(device_interface)
            : c10d::ProcessGroupGloo::createDeviceForHostname(device_host));
    options->threads = 1;
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
    *out = new multipos_group{group, timeout};
  });
}

// Ends the caller's use of a group. A collective still in flight (a peer stalled) holds the
// group's threads until its timeout; the group is then let go on a thread of its own, so the
// caller never waits for it.
extern "C" void multipos_group_free(multipos_group* group, int in_flight) {
  if (in_flight) {
    std::thread([g = std::unique_ptr<multipos_group>(group)]() mutable { g.reset(); }).detach();
  } else {
    delete group;
  }
}

// Starts gathering every rank's `local` tensor (the same shape on every rank) into one tensor of
// size × local's rows, in rank order.
extern "C" int multipos_all_gather(multipos_group* group, void* local, multipos_work** out,
                                   char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    auto input = static_cast<at::Tensor*>(local)->contiguous();
    auto shape = input.sizes().vec();
    shape[0] *= group->backend->getSize();
    auto output = at::empty(shape, input.options());
    c10d::AllgatherOptions opts;
    opts.timeout = group->timeout;
    auto work = group->backend->_allgather_base(output, input, opts);
    *out = new multipos_work{work, output};
  });
}

// Starts summing `tensor` (contiguous) in place over every rank.
extern "C" int multipos_all_reduce_sum(multipos_group* group, void* tensor, multipos_work** out,
                                       char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    auto work = group->backend->allreduce(tensors, opts);
    *out = new multipos_work{work, tensors[0]};
  });
}

// Waits up to `wait_ms` for a collective: 0 done, 1 failed (`error` says why), 2 still running.
// Polls `isCompleted` rather than waiting with a timeout: c10d reports a timed-out wait by throwing,
// with a backtrace, which every slice of a long collective would pay for.
extern "C" int multipos_work_wait(multipos_work* work, int64_t wait_ms, char* error,
                                  size_t error_len) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  while (!work->work->isCompleted()) {
    if (std::chrono::steady_clock::now() >= deadline) return 2;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return guarded(error, error_len, [&] { work->work->wait(); });
}

// The result of a finished collective, as a new tch handle.
extern "C" void* multipos_work_output(multipos_work* work) {
  return new at::Tensor(work->output);
}

extern "C" void multipos_work_free(multipos_work* work) { delete work; }
