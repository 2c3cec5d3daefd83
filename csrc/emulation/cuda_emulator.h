// A CPU emulator of the few CUDA features the fused kernels use (see
// csrc/cuda/device_runtime.cuh), so that their own source, compiled as C++
// with GUNN_EXT_EMULATE_CUDA, runs on CPU tensors in the tests.
//
// A launch runs its blocks one after another, in index order or (reversed)
// the other way round: a GPU runs them in any order and at once, so a kernel
// whose blocks depend on each other within a launch gives different results
// in the two orders. The threads of a block run concurrently, one
// std::thread each: __syncthreads() is a real barrier, shared memory is
// really shared by the block (and only by it, since blocks do not overlap),
// and a thread that returns early leaves the barrier, as an exited GPU thread
// stops counting. The threads that meet at a barrier must have called the
// same __syncthreads() (a GPU hangs or corrupts shared memory otherwise): the
// emulator fails a launch where they did not. Shared memory, dynamic and
// static (GUNN_SHARED_ARRAY), is filled with NaN bytes before every block,
// so a kernel that reads it before writing it fails its test. Launch
// configurations are checked against CUDA's limits, and vector accesses
// against their alignment (load_aligned, store_aligned).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <source_location>
#include <thread>
#include <unistd.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define GUNN_SHARED_ARRAY(T, name, N) \
  T(&name)[N] = ::gunn_ext::cuda::emulator::shared_array<T, N, decltype([] {})>()
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

namespace gunn_ext {
namespace cuda {

namespace emulator {

// A block's barrier, which checks that the threads meeting at it called the
// same __syncthreads() (a default site, line 0: a thread that has returned).
class BlockBarrier {
 public:
  explicit BlockBarrier(unsigned threads) : sites_(threads), barrier_(threads, Check{this}) {}

  void wait(unsigned thread, const std::source_location& site) {
    sites_[thread] = site;
    barrier_.arrive_and_wait();
  }
  void exit(unsigned thread) {
    sites_[thread] = std::source_location();
    barrier_.arrive_and_drop();
  }
  bool diverged() const { return diverged_; }

 private:
  struct Check {
    BlockBarrier* self;
    void operator()() noexcept {
      const std::source_location* first = nullptr;
      for (const std::source_location& s : self->sites_) {
        if (s.line() == 0) continue;
        if (first == nullptr) {
          first = &s;
        } else if (s.line() != first->line() || std::strcmp(s.file_name(), first->file_name()) != 0) {
          self->diverged_ = true;
        }
      }
    }
  };
  std::vector<std::source_location> sites_;
  bool diverged_ = false;
  std::barrier<Check> barrier_;
};

inline thread_local BlockBarrier* block_barrier = nullptr;

// The threads that run a block's threads, kept from block to block (starting
// a thread per GPU thread per block made the emulator slow).
class BlockThreads {
 public:
  // body(t) on threads t = 0 .. count - 1 at once; returns when all are done.
  void run(unsigned count, const std::function<void(unsigned)>& body) {
    if (threads_.size() != count) resize(count);
    std::unique_lock<std::mutex> lock(mutex_);
    body_ = &body;
    running_ = count;
    ++generation_;
    started_.notify_all();
    done_.wait(lock, [&] { return running_ == 0; });
  }

 private:
  void resize(unsigned count) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    started_.notify_all();
    threads_.clear();  // joins them
    stopping_ = false;
    const uint64_t seen = generation_;
    for (unsigned t = 0; t < count; ++t) threads_.emplace_back([this, t, seen] { serve(t, seen); });
  }

  // Runs body(t) for every generation after `seen`.
  void serve(unsigned t, uint64_t seen) {
    while (true) {
      const std::function<void(unsigned)>* body;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        started_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        body = body_;
      }
      (*body)(t);
      const std::lock_guard<std::mutex> lock(mutex_);
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable started_, done_;
  const std::function<void(unsigned)>* body_ = nullptr;
  unsigned running_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::vector<std::jthread> threads_;
};

// Never destroyed: its threads wait for work until the process exits. A
// forked child, which has none of them, gets its own.
inline BlockThreads& block_threads() {
  static BlockThreads* threads = nullptr;
  static pid_t owner = 0;
  if (threads == nullptr || owner != getpid()) {
    threads = new BlockThreads;
    owner = getpid();
  }
  return *threads;
}

// The launch's dynamic shared memory, and the static shared arrays
// (GUNN_SHARED_ARRAY) used so far: filled with NaN bytes before every block.
inline std::vector<std::max_align_t> shared_memory;
struct SharedArray {
  void* data;
  size_t bytes;
};
inline std::mutex shared_arrays_mutex;
inline std::vector<SharedArray> shared_arrays;

// The storage of one GUNN_SHARED_ARRAY (Site: a type unique to it).
template <typename T, size_t N, typename Site>
T (&shared_array())[N] {
  static T storage[N];
  static const bool registered = [] {
    std::memset(static_cast<void*>(storage), 0xff, sizeof storage);
    const std::lock_guard<std::mutex> lock(shared_arrays_mutex);
    shared_arrays.push_back({storage, sizeof storage});
    return true;
  }();
  (void)registered;
  return storage;
}

inline void fill_shared_memory() {
  if (!shared_memory.empty()) {
    std::memset(shared_memory.data(), 0xff, shared_memory.size() * sizeof(std::max_align_t));
  }
  const std::lock_guard<std::mutex> lock(shared_arrays_mutex);
  for (const SharedArray& a : shared_arrays) std::memset(a.data, 0xff, a.bytes);
}

// Kernel launches so far (the tests count them per segment).
inline std::atomic<int64_t> launches{0};
// Whether launches run their blocks last to first.
inline std::atomic<bool> reversed{false};
// The first address a kernel of this launch accessed misaligned for its type.
inline std::atomic<const void*> misaligned{nullptr};
}  // namespace emulator

// A T at address, and a store of one: a GPU faults ("misaligned address")
// where the address is not aligned to T, so the emulator records the first
// such access of a launch (copying bytewise, as a CPU may fault too) and
// fails the launch.
template <typename T>
bool aligned_for(const void* address) {
  if (reinterpret_cast<std::uintptr_t>(address) % alignof(T) == 0) return true;
  const void* none = nullptr;
  emulator::misaligned.compare_exchange_strong(none, address);
  return false;
}

template <typename T>
T load_aligned(const void* address) {
  if (aligned_for<T>(address)) return *static_cast<const T*>(address);
  T value;
  std::memcpy(&value, address, sizeof(T));
  return value;
}

template <typename T>
void store_aligned(void* address, const T& value) {
  if (aligned_for<T>(address)) {
    *static_cast<T*>(address) = value;
  } else {
    std::memcpy(address, &value, sizeof(T));
  }
}

class DeviceScope {
 public:
  explicit DeviceScope(c10::Device) {}
  explicit DeviceScope(const at::Tensor&) {}
  cudaStream_t stream() const { return nullptr; }
};

inline void __syncthreads(std::source_location site = std::source_location::current()) {
  emulator::block_barrier->wait(threadIdx.x, site);
}

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(emulator::shared_memory.data());
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t,
            Args&&... args) {
  TORCH_CHECK(block.x >= 1 && block.x <= 1024 && block.y == 1 && block.z == 1,
              "cuda emulator: blocks must be 1-D with 1..1024 threads, got ", block.x, "x",
              block.y, "x", block.z);
  TORCH_CHECK(grid.x >= 1 && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535,
              "cuda emulator: invalid grid ", grid.x, "x", grid.y, "x", grid.z);
  TORCH_CHECK(shared_bytes <= 48 * 1024, "cuda emulator: ", shared_bytes,
              " bytes of dynamic shared memory exceed the 48 KiB available without opt-in");
  ++emulator::launches;
  const size_t words = (shared_bytes + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
  emulator::shared_memory.assign(words, std::max_align_t{});
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  const bool reversed = emulator::reversed.load();
  std::optional<dim3> diverged_block;
  for (uint64_t i = 0; i < blocks; ++i) {
    const uint64_t b = reversed ? blocks - 1 - i : i;
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (uint64_t(grid.x) * grid.y));
    emulator::fill_shared_memory();
    emulator::BlockBarrier barrier(block.x);
    emulator::block_threads().run(block.x, [&](unsigned t) {
      threadIdx = dim3(t);
      emulator::block_barrier = &barrier;
      kernel(args...);
      barrier.exit(t);
    });
    if (barrier.diverged() && !diverged_block) diverged_block = blockIdx;
  }
  const void* address = emulator::misaligned.exchange(nullptr);
  TORCH_CHECK(address == nullptr, "cuda emulator: misaligned address ", address,
              " (an access wider than the alignment of its address)");
  TORCH_CHECK(!diverged_block, "cuda emulator: the threads of block (", diverged_block->x, ", ",
              diverged_block->y, ", ", diverged_block->z, ") met at different __syncthreads() calls");
}

}  // namespace cuda
}  // namespace gunn_ext
