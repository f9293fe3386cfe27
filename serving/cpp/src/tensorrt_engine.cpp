// TensorRT engine kind (TensorRT 10.x / 11.x C++ API). NEVER COMPILED OR RUN on our machines:
// TensorRT cannot be installed there. Written against NvInferRuntime.h of TensorRT 10 (names
// cross-checked with the Python API lists of 10.16 and 11.1 by tests/test_serving_cpp.py).
//
// What it does, as the notes describe (shared/notes/tensorrt.md, "Running and CUDA graphs"):
// - one IRuntime; three ICudaEngine from the plans dfosd's tensorrt_build wrote; one
//   IExecutionContext each, created with ExecutionContextAllocationStrategy::kUSER_MANAGED;
// - one activation buffer of the largest getDeviceMemorySizeV2() shared by the three contexts
//   (they run one after another on one stream, so their scratch memory never overlaps in time);
// - boundary tensors (lr_image, latent, denoised_latent, sr_image) in device buffers bound by
//   name with setTensorAddress, checked against the dfosd contract (names, dtypes, static shapes);
// - pinned host staging buffers, and the whole step -- copy in, three enqueueV3, copy out --
//   captured once in a single CUDA graph after a warm-up run, replayed per tile batch. If capture
//   fails the error is cleared and the step runs as plain enqueues.

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"

#if NV_TENSORRT_MAJOR < 10
#error "dfosd_runner's TensorRT kind needs TensorRT 10 or newer (getDeviceMemorySizeV2, enqueueV3)"
#endif

namespace dfosd {
namespace {

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error(path + ": cannot open (build the plans with dfosd's tensorrt_build)");
  std::vector<char> data(static_cast<size_t>(in.tellg()));
  in.seekg(0);
  in.read(data.data(), static_cast<std::streamsize>(data.size()));
  if (!in) throw std::runtime_error(path + ": read failed");
  return data;
}

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kUINT8: return 1;
    default: throw std::runtime_error("unexpected tensor data type at a part boundary");
  }
}

struct Boundary {  // one tensor between parts: its contract and device buffer
  nvinfer1::DataType dtype;
  nvinfer1::Dims dims;
  size_t bytes = 0;
  void* device = nullptr;
};

bool same_dims(const nvinfer1::Dims& a, const nvinfer1::Dims& b) {
  if (a.nbDims != b.nbDims) return false;
  for (int i = 0; i < a.nbDims; ++i)
    if (a.d[i] != b.d[i]) return false;
  return true;
}

// The contract (core/contracts.py): tensor name -> (is input, dtype) per part.
struct PartIo {
  const char* input;
  const char* output;
};
constexpr std::array<PartIo, 3> kChain{{{"lr_image", "latent"}, {"latent", "denoised_latent"},
                                        {"denoised_latent", "sr_image"}}};

class TensorRtEngine : public TileEngine {
 public:
  explicit TensorRtEngine(const PartFiles& files) {
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed");
    const std::array<std::string, 3> paths{files.encoder, files.unet, files.decoder};
    int64_t activation_bytes = 0;
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::vector<char> blob = read_file(paths[i]);
      engines_[i].reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
      if (!engines_[i])
        throw std::runtime_error(paths[i] + ": TensorRT could not deserialize it (built for another TensorRT "
                                 "version or GPU? rebuild: python -m dfosd.engines.tensorrt_build DIR)");
      check_io(*engines_[i], kChain[i], paths[i]);
      activation_bytes = std::max<int64_t>(activation_bytes, engines_[i]->getDeviceMemorySizeV2());
    }
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (activation_bytes > 0) cuda_check(cudaMalloc(&activations_, activation_bytes), "cudaMalloc(activations)");
    for (auto& [name, b] : boundaries_) cuda_check(cudaMalloc(&b.device, b.bytes), "cudaMalloc(boundary)");
    for (size_t i = 0; i < engines_.size(); ++i) {
      contexts_[i].reset(
          engines_[i]->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
      if (!contexts_[i]) throw std::runtime_error(paths[i] + ": createExecutionContext failed");
      contexts_[i]->setDeviceMemoryV2(activations_, activation_bytes);
      for (const char* name : {kChain[i].input, kChain[i].output})
        if (!contexts_[i]->setTensorAddress(name, boundaries_.at(name).device))
          throw std::runtime_error(paths[i] + ": setTensorAddress(" + std::string(name) + ") failed");
    }
    const Boundary& lr = boundaries_.at("lr_image");
    const Boundary& sr = boundaries_.at("sr_image");
    batch_ = static_cast<int>(lr.dims.d[0]);
    tile_ = static_cast<int>(lr.dims.d[2]);
    scale_ = static_cast<int>(sr.dims.d[2] / lr.dims.d[2]);
    if (lr.dtype != nvinfer1::DataType::kUINT8 || sr.dtype != nvinfer1::DataType::kUINT8 || lr.dims.nbDims != 4 ||
        lr.dims.d[1] != 3 || lr.dims.d[2] != lr.dims.d[3] || sr.dims.d[0] != lr.dims.d[0] ||
        sr.dims.d[2] != int64_t{tile_} * scale_)
      throw std::runtime_error("TensorRT plans: lr_image/sr_image are not uint8 [B,3,t,t] -> [B,3,st,st]");
    cuda_check(cudaMallocHost(&host_in_, lr.bytes), "cudaMallocHost");
    cuda_check(cudaMallocHost(&host_out_, sr.bytes), "cudaMallocHost");
    std::memset(host_in_, 0, lr.bytes);
    activation_bytes_ = activation_bytes;
  }

  ~TensorRtEngine() override {
    if (graph_exec_) cudaGraphExecDestroy(graph_exec_);
    for (auto& c : contexts_) c.reset();  // contexts before engines before the runtime
    for (auto& e : engines_) e.reset();
    runtime_.reset();
    for (auto& [name, b] : boundaries_) cudaFree(b.device);
    if (activations_) cudaFree(activations_);
    if (host_in_) cudaFreeHost(host_in_);
    if (host_out_) cudaFreeHost(host_out_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int tile() const override { return tile_; }
  int batch() const override { return batch_; }
  int scale() const override { return scale_; }

  void run(const uint8_t* lr, int n, uint8_t* sr) override {
    const Boundary& in = boundaries_.at("lr_image");
    const Boundary& out = boundaries_.at("sr_image");
    const size_t lr_tile = in.bytes / batch_, sr_tile = out.bytes / batch_;
    std::memcpy(host_in_, lr, lr_tile * n);
    if (n < batch_) std::memset(static_cast<uint8_t*>(host_in_) + lr_tile * n, 0, lr_tile * (batch_ - n));
    if (!graph_exec_ && use_graph_) capture();
    if (graph_exec_) {
      cuda_check(cudaGraphLaunch(graph_exec_, stream_), "cudaGraphLaunch");
    } else {
      enqueue_step();
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    std::memcpy(sr, host_out_, sr_tile * n);
  }

  std::string describe() const override {
    return std::string("TensorRT ") + std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
           " plans (tile " + std::to_string(tile_) + ", batch " + std::to_string(batch_) + ", shared activations " +
           std::to_string(activation_bytes_ >> 20) + " MiB, " + (graph_exec_ ? "one CUDA graph" : "no CUDA graph") +
           ")";
  }

 private:
  void check_io(const nvinfer1::ICudaEngine& engine, const PartIo& io, const std::string& path) {
    if (engine.getNbIOTensors() != 2)
      throw std::runtime_error(path + ": expected 2 I/O tensors (" + io.input + " -> " + io.output + ")");
    for (int i = 0; i < engine.getNbIOTensors(); ++i) {
      const char* name = engine.getIOTensorName(i);
      const bool is_input = engine.getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      const char* want = is_input ? io.input : io.output;
      if (std::string(name) != want)
        throw std::runtime_error(path + ": tensor '" + name + "' is not the contract's " + want);
      const nvinfer1::Dims dims = engine.getTensorShape(name);
      size_t count = 1;
      for (int d = 0; d < dims.nbDims; ++d) {
        if (dims.d[d] < 0) throw std::runtime_error(path + ": '" + name + "' has a dynamic shape (dfosd plans are static)");
        count *= static_cast<size_t>(dims.d[d]);
      }
      Boundary b{engine.getTensorDataType(name), dims, count * element_size(engine.getTensorDataType(name)), nullptr};
      auto [it, added] = boundaries_.emplace(name, b);
      if (!added && (it->second.dtype != b.dtype || !same_dims(it->second.dims, b.dims)))
        throw std::runtime_error(path + ": '" + name + "' differs from the same tensor of the previous part");
    }
  }

  void enqueue_step() {
    const Boundary& in = boundaries_.at("lr_image");
    const Boundary& out = boundaries_.at("sr_image");
    cuda_check(cudaMemcpyAsync(in.device, host_in_, in.bytes, cudaMemcpyHostToDevice, stream_), "copy in");
    for (size_t i = 0; i < contexts_.size(); ++i)
      if (!contexts_[i]->enqueueV3(stream_)) throw std::runtime_error("enqueueV3 failed for part " + std::to_string(i));
    cuda_check(cudaMemcpyAsync(host_out_, out.device, out.bytes, cudaMemcpyDeviceToHost, stream_), "copy out");
  }

  void capture() {
    use_graph_ = false;  // one attempt
    enqueue_step();      // warm-up outside capture: lazy initialisation must not be captured
    cuda_check(cudaStreamSynchronize(stream_), "warm-up");
    cudaGraph_t graph = nullptr;
    bool ok = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
    if (ok) {
      try {
        enqueue_step();
      } catch (const std::exception& e) {
        std::cerr << "dfosd_runner: CUDA graph capture failed (" << e.what() << "); running without it\n";
        ok = false;
      }
      // End the capture whatever happened, so the stream is usable again.
      const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
      ok = ok && end == cudaSuccess && graph != nullptr;
    }
    if (ok) ok = cudaGraphInstantiateWithFlags(&graph_exec_, graph, 0) == cudaSuccess;
    if (graph) cudaGraphDestroy(graph);
    if (!ok) {
      graph_exec_ = nullptr;
      cudaGetLastError();  // clear the capture error; plain enqueues from here on
      std::cerr << "dfosd_runner: running without a CUDA graph\n";
    }
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::array<std::unique_ptr<nvinfer1::ICudaEngine>, 3> engines_;
  std::array<std::unique_ptr<nvinfer1::IExecutionContext>, 3> contexts_;
  std::map<std::string, Boundary> boundaries_;
  void* activations_ = nullptr;
  int64_t activation_bytes_ = 0;
  void* host_in_ = nullptr;
  void* host_out_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  bool use_graph_ = true;
  int tile_ = 0, batch_ = 0, scale_ = 0;
};

}  // namespace

std::unique_ptr<TileEngine> make_tensorrt_engine(const PartFiles& files) {
  return std::make_unique<TensorRtEngine>(files);
}

}  // namespace dfosd
