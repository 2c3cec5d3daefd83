// The CUDA kernels of the gradual_update ops: the device-generic orchestration,
// replayed as one CUDA graph per call once a call has recurred.
//
// A call is identified by a key: shapes, strides, dtypes and data pointers of
// every input and output, the scalar arguments, and the global flags that
// choose cuBLAS / cuDNN algorithms. Outputs are allocated before the key is
// built, outside any capture, so a replay writes only into tensors this call
// returns. In steady-state training the caching allocator hands back the same
// blocks every step, so keys recur and each call becomes one graph launch.
//
//  * The first sighting of a key runs eagerly; the second captures (after one
//    warm-up run, on a side stream joined to the current one with events) and
//    replays; later ones replay. A key evicted from the LRU cache and seen
//    again is captured at most once more, then runs eagerly for good.
//  * Each graph owns a private memory pool holding its intermediates.
//  * Calls on a stream that is already capturing (a user's own CUDA graph,
//    torch.compile's cudagraph trees) run eagerly, inside that capture.
//  * GUNN_EXT_CUDA_GRAPHS=0 disables replay; GUNN_EXT_CUDA_GRAPHS_CACHE sets
//    the number of graphs kept per op (default 8). gunn_ext.cuda_graphs
//    switches it at run time.
#include <ATen/Context.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/ops/_foreach_copy.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../conventions.h"
#include "../gradual_update.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace gunn_ext {
namespace {

using at::Tensor;
using at::TensorList;

bool env_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  const std::string v(value);
  return !(v == "0" || v == "false" || v == "off" || v == "no" || v == "FALSE" || v == "OFF");
}

size_t env_capacity() {
  const char* value = std::getenv("GUNN_EXT_CUDA_GRAPHS_CACHE");
  if (value == nullptr || *value == '\0') return 8;
  char* end = nullptr;
  const long parsed = std::strtol(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && parsed >= 0,
              "gunn_ext: GUNN_EXT_CUDA_GRAPHS_CACHE must be a non-negative integer, got '", value,
              "'");
  return static_cast<size_t>(parsed);
}

std::atomic<bool>& graphs_enabled() {
  static std::atomic<bool> enabled{env_flag("GUNN_EXT_CUDA_GRAPHS", true)};
  return enabled;
}

// Everything a captured graph depends on, as a flat list of integers.
class Key {
 public:
  void add(int64_t v) { words_.push_back(v); }
  void add(bool v) { words_.push_back(v ? 1 : 0); }
  void add(double v) {
    int64_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    words_.push_back(bits);
  }
  void add(const Tensor& t) {
    if (!t.defined()) {
      add(int64_t(-1));
      return;
    }
    add(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())));
    add(static_cast<int64_t>(t.scalar_type()));
    add(static_cast<int64_t>(t.device().index()));
    add(t.dim());
    for (int64_t s : t.sizes()) add(s);
    for (int64_t s : t.strides()) add(s);
  }
  void add(TensorList ts) {
    add(static_cast<int64_t>(ts.size()));
    for (const Tensor& t : ts) add(t);
  }
  void add(at::IntArrayRef vs) {
    add(static_cast<int64_t>(vs.size()));
    for (int64_t v : vs) add(v);
  }
  void add(at::ArrayRef<double> vs) {
    add(static_cast<int64_t>(vs.size()));
    for (double v : vs) add(v);
  }
  // The global switches that decide which cuBLAS / cuDNN kernels run.
  void add_backend_flags() {
    auto& ctx = at::globalContext();  // blasPreferredBackend() is not const
    add(ctx.deterministicAlgorithms());
    add(ctx.deterministicFillUninitializedMemory());
    add(ctx.userEnabledCuDNN());
    add(ctx.deterministicCuDNN());
    add(ctx.benchmarkCuDNN());
    add(ctx.allowTF32CuBLAS());
    add(ctx.allowTF32CuDNN(at::Float32Op::CONV));
    add(static_cast<int64_t>(ctx.float32MatmulPrecision()));
    add(static_cast<int64_t>(ctx.allowFP16ReductionCuBLAS()));
    add(static_cast<int64_t>(ctx.allowBF16ReductionCuBLAS()));
    add(ctx.allowFP16AccumulationCuBLAS());
    add(static_cast<int64_t>(ctx.blasPreferredBackend()));
  }

  void reserve(size_t words) { words_.reserve(words); }
  bool operator==(const Key& other) const { return words_ == other.words_; }
  size_t hash() const {
    size_t h = 0xcbf29ce484222325ull;
    for (int64_t w : words_) h = (h ^ static_cast<size_t>(w)) * 0x100000001b3ull;
    return h;
  }

 private:
  std::vector<int64_t> words_;
};

struct KeyHash {
  size_t operator()(const Key& k) const { return k.hash(); }
};

// Event calls in this file must not break another thread's global-mode capture.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode_)); }
  ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// A graph that left the cache is destroyed once the GPU has passed the point
// where it was evicted, so an in-flight replay never loses its executable.
struct Retired {
  std::shared_ptr<at::cuda::CUDAGraph> graph;
  cudaEvent_t done;
};

class GraphCache {
 public:
  enum class Action { kEager, kCapture, kReplay };
  static constexpr int kMaxCapturesPerKey = 2;
  static constexpr size_t kMaxHistory = 4096;

  // What to do for `key`; on kReplay, `graph` is set.
  Action decide(const Key& key, std::shared_ptr<at::cuda::CUDAGraph>& graph) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = index_.find(key);
    if (found != index_.end()) {
      lru_.splice(lru_.begin(), lru_, found->second);
      graph = found->second->second;
      ++replays_;
      return Action::kReplay;
    }
    if (history_.size() >= kMaxHistory) history_.clear();
    Sightings& seen = history_[key.hash()];
    ++seen.calls;
    if (capacity_ == 0 || seen.calls < 2 || seen.captures >= kMaxCapturesPerKey) {
      ++eager_;
      return Action::kEager;
    }
    ++seen.captures;
    return Action::kCapture;
  }

  void insert(const Key& key, std::shared_ptr<at::cuda::CUDAGraph> graph, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++captures_;
    if (index_.count(key)) {  // another thread captured it meanwhile
      retire(std::move(graph), stream);
      return;
    }
    lru_.emplace_front(key, std::move(graph));
    index_[key] = lru_.begin();
    while (lru_.size() > capacity_) {
      retire(std::move(lru_.back().second), stream);
      index_.erase(lru_.back().first);
      lru_.pop_back();
    }
    collect_retired();
  }

  void failed_capture(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    history_[key.hash()].captures = kMaxCapturesPerKey;
    ++eager_;
  }

  void clear(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& entry : lru_) retire(std::move(entry.second), stream);
    lru_.clear();
    index_.clear();
    history_.clear();
    captures_ = replays_ = eager_ = 0;
    collect_retired();
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {captures_, replays_, eager_, static_cast<int64_t>(lru_.size())};
  }

 private:
  struct Sightings {
    int calls = 0, captures = 0;
  };
  using Entry = std::pair<Key, std::shared_ptr<at::cuda::CUDAGraph>>;

  void retire(std::shared_ptr<at::cuda::CUDAGraph> graph, cudaStream_t stream) {
    const RelaxedCaptureMode relaxed;
    cudaEvent_t done;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(done, stream));
    retired_.push_back({std::move(graph), done});
  }

  void collect_retired() {
    const RelaxedCaptureMode relaxed;
    for (auto it = retired_.begin(); it != retired_.end();) {
      const cudaError_t status = cudaEventQuery(it->done);
      if (status == cudaErrorNotReady) {
        (void)cudaGetLastError();
        ++it;
        continue;
      }
      C10_CUDA_CHECK(status);
      C10_CUDA_CHECK(cudaEventDestroy(it->done));
      it = retired_.erase(it);
    }
  }

  std::mutex mutex_;
  size_t capacity_ = env_capacity();
  std::list<Entry> lru_;
  std::unordered_map<Key, std::list<Entry>::iterator, KeyHash> index_;
  // Sightings by key hash: a collision can only make a capture come one call early.
  std::unordered_map<size_t, Sightings> history_;
  std::vector<Retired> retired_;
  int64_t captures_ = 0, replays_ = 0, eager_ = 0;
};

GraphCache& forward_cache() {
  static GraphCache* cache = new GraphCache();  // outlives the CUDA context
  return *cache;
}

GraphCache& backward_cache() {
  static GraphCache* cache = new GraphCache();
  return *cache;
}

// `waiter` waits for everything queued on `producer` so far.
void join(const c10::cuda::CUDAStream& producer, const c10::cuda::CUDAStream& waiter) {
  const RelaxedCaptureMode relaxed;
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, producer.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), event, 0));
  C10_CUDA_CHECK(cudaEventDestroy(event));
}

// The stream graphs are captured on: one per device, ours alone, so no other
// work shares its cuBLAS workspace.
c10::cuda::CUDAStream capture_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<cudaStream_t> streams(c10::cuda::device_count(), nullptr);
  std::lock_guard<std::mutex> lock(mutex);
  if (streams.at(device) == nullptr) {
    const c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[device], cudaStreamNonBlocking));
  }
  return c10::cuda::getStreamFromExternal(streams[device], device);
}

// Torch before 2.14 does not undo a failed capture's allocator routing
// (pytorch#190308), which breaks later empty_cache() calls. Undo it here, keep
// the graph object alive so that it cannot undo it a second time, and capture
// no more graphs in this process.
void abandon_capture(std::shared_ptr<at::cuda::CUDAGraph> graph, c10::DeviceIndex device,
                     c10::MempoolId_t pool) {
  try {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
  } catch (const c10::Error&) {
  }
  try {
    at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(pool);
  } catch (const c10::Error&) {
  }
  static auto* abandoned = new std::vector<std::shared_ptr<at::cuda::CUDAGraph>>();
  abandoned->push_back(std::move(graph));
  graphs_enabled().store(false);
}

// Key for this call, or nothing when this call must run eagerly.
std::optional<Key> graph_key(const Tensor& x) {
  if (!graphs_enabled().load(std::memory_order_relaxed)) return std::nullopt;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None)
    return std::nullopt;
  Key key;
  key.reserve(1024);
  key.add(static_cast<int64_t>(x.device().index()));
  try {
    key.add_backend_flags();
  } catch (const c10::Error&) {
    return std::nullopt;  // flags this torch cannot report: never guess
  }
  return key;
}

// Runs `write_outputs` (which fills tensors allocated by the caller) through
// the graph cache: eagerly, by capture then replay, or by replay.
template <typename Run>
bool run_through_graph(GraphCache& cache, const Key& key, const c10::Device& device, Run&& run) {
  std::shared_ptr<at::cuda::CUDAGraph> graph;
  switch (cache.decide(key, graph)) {
    case GraphCache::Action::kEager:
      return false;
    case GraphCache::Action::kReplay:
      graph->replay();
      return true;
    case GraphCache::Action::kCapture:
      break;
  }
  const auto current = c10::cuda::getCurrentCUDAStream(device.index());
  const auto side = capture_stream(device.index());
  join(current, side);
  graph = std::make_shared<at::cuda::CUDAGraph>();
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    run();  // warm-up: lazy library initialisation and algorithm choice happen outside capture
    const auto pool = at::cuda::graph_pool_handle();
    try {
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      run();
      graph->capture_end();
    } catch (const c10::Error& e) {
      if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
        cudaGraph_t abandoned = nullptr;
        (void)cudaStreamEndCapture(side.stream(), &abandoned);
        if (abandoned != nullptr) (void)cudaGraphDestroy(abandoned);
      }
      (void)cudaGetLastError();
      abandon_capture(std::move(graph), device.index(), pool);
      TORCH_WARN_ONCE("gunn_ext: capturing a CUDA graph failed, so CUDA graph replay is off "
                      "for this process (", e.what_without_backtrace(), ")");
    }
  }
  join(side, current);
  if (!graph) {
    cache.failed_capture(key);
    return true;  // the warm-up already wrote the outputs
  }
  cache.insert(key, graph, current.stream());
  graph->replay();
  return true;
}

// An output shaped like x, in the layout the orchestration returns.
Tensor output_like(const Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(output_memory_format(x)));
}

ForwardResult gradual_update_cuda(const Tensor& x, const Tensor& conv_weight, const Tensor& bn_weight,
                                  const Tensor& bn_bias, const std::optional<Tensor>& running_mean,
                                  const std::optional<Tensor>& running_var, at::IntArrayRef segments,
                                  int64_t expansion, int64_t bottlenecks, bool shortcut,
                                  bool sequential, bool training, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto eager = [&] {
    return gradual_update(x, conv_weight, bn_weight, bn_bias, running_mean, running_var, segments,
                          expansion, bottlenecks, shortcut, sequential, training, eps);
  };
  std::optional<Key> key = graph_key(x);
  if (!key || x.dim() != 4 || bn_weight.dim() != 1) return eager();
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  Tensor y = output_like(x);
  Tensor mean = at::empty({bn_weight.size(0)}, stats_options);
  Tensor var = at::empty({bn_weight.size(0)}, stats_options);
  key->add(int64_t(0));
  for (const Tensor& t : {x, y, mean, var, conv_weight, bn_weight, bn_bias}) key->add(t);
  for (const auto& t : {running_mean, running_var}) key->add(t.has_value() ? *t : Tensor());
  key->add(segments);
  key->add(expansion);
  key->add(bottlenecks);
  for (bool flag : {shortcut, sequential, training}) key->add(flag);
  key->add(eps);
  auto write_outputs = [&] {
    auto [y_eager, mean_eager, var_eager] = eager();
    at::_foreach_copy_({y, mean, var}, {y_eager, mean_eager, var_eager});
  };
  if (!run_through_graph(forward_cache(), *key, x.device(), write_outputs)) {
    y.reset(), mean.reset(), var.reset();  // not needed: free them before the eager run
    return eager();
  }
  return {y, mean, var};
}

BackwardResult gradual_update_backward_cuda(const Tensor& grad_y, const Tensor& x, const Tensor& y,
                                            const Tensor& conv_weight, const Tensor& bn_weight,
                                            const Tensor& bn_bias, const Tensor& mean,
                                            const Tensor& var, at::IntArrayRef segments,
                                            int64_t expansion, int64_t bottlenecks, bool shortcut,
                                            bool sequential, bool training, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto eager = [&] {
    return gradual_update_backward(grad_y, x, y, conv_weight, bn_weight, bn_bias, mean, var,
                                   segments, expansion, bottlenecks, shortcut, sequential, training,
                                   eps);
  };
  std::optional<Key> key = graph_key(x);
  if (!key || x.dim() != 4) return eager();
  Tensor grad_x = output_like(x);
  Tensor grad_conv = at::empty(conv_weight.sizes(), conv_weight.options());
  Tensor grad_weight = at::empty(bn_weight.sizes(), bn_weight.options());
  Tensor grad_bias = at::empty(bn_bias.sizes(), bn_bias.options());
  key->add(int64_t(1));
  for (const Tensor& t : {grad_y, x, y, mean, var, grad_x, conv_weight, bn_weight, bn_bias, grad_conv,
                          grad_weight, grad_bias})
    key->add(t);
  key->add(segments);
  key->add(expansion);
  key->add(bottlenecks);
  for (bool flag : {shortcut, sequential, training}) key->add(flag);
  key->add(eps);
  auto write_outputs = [&] {
    auto [gx, gc, gw, gb] = eager();
    at::_foreach_copy_({grad_x, grad_conv, grad_weight, grad_bias}, {gx, gc, gw, gb});
  };
  if (!run_through_graph(backward_cache(), *key, x.device(), write_outputs)) {
    grad_x.reset(), grad_conv.reset(), grad_weight.reset(), grad_bias.reset();
    return eager();
  }
  return {grad_x, grad_conv, grad_weight, grad_bias};
}

bool set_cuda_graphs(bool enabled) { return graphs_enabled().exchange(enabled); }

bool cuda_graphs_enabled() { return graphs_enabled().load(); }

// [captures, replays, eager calls, graphs cached] of the forward op, then of
// the backward op.
std::vector<int64_t> cuda_graphs_stats() {
  std::vector<int64_t> out = forward_cache().stats();
  const std::vector<int64_t> backward = backward_cache().stats();
  out.insert(out.end(), backward.begin(), backward.end());
  return out;
}

void clear_cuda_graphs() {
  if (c10::cuda::device_count() == 0) return;  // nothing can have been captured
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  forward_cache().clear(stream);
  backward_cache().clear(stream);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gunn_ext, m) {
  m.def("set_cuda_graphs(bool enabled) -> bool", &set_cuda_graphs);
  m.def("cuda_graphs_enabled() -> bool", &cuda_graphs_enabled);
  m.def("cuda_graphs_stats() -> int[]", &cuda_graphs_stats);
  m.def("clear_cuda_graphs() -> ()", &clear_cuda_graphs);
}

TORCH_LIBRARY_IMPL(gunn_ext, CUDA, m) {
  m.impl("gradual_update", &gradual_update_cuda);
  m.impl("gradual_update_backward", &gradual_update_backward_cuda);
}

}  // namespace gunn_ext
