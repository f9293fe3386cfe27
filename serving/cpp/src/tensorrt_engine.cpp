// TensorRT engine kind (TensorRT 10.x / 11.x C++ API). NEVER COMPILED OR RUN on our machines:
// TensorRT cannot be installed there. Written against NvInferRuntime.h of TensorRT 10 (names
// cross-checked with the Python API lists of 10.16 and 11.1 by tests/test_serving_cpp.py).
//
// What it does (TensorRT's documented running and CUDA-graph rules):
// - one IRuntime; one ICudaEngine per part of the export's chain (export_dir.h: the plans named by
//   each part's <stem>.plan.json); one IExecutionContext each, created with
//   ExecutionContextAllocationStrategy::kUSER_MANAGED;
// - one activation buffer of the largest getDeviceMemorySizeV2() shared by the contexts
//   (they run one after another on one stream, so their scratch memory never overlaps in time);
// - boundary tensors (lr_image, latent, denoised_latent, sr_image: the names in the manifest's
//   contracts) in device buffers bound by name with setTensorAddress; every engine's I/O tensors
//   are checked against its part's contract (names, modes, dtypes, static shapes);
// - pinned host staging buffers, and the whole step -- copy in, one enqueueV3 per part, copy out --
//   captured once in a single CUDA graph after a warm-up run, replayed per tile batch. If capture
//   fails the error is cleared and the step runs as plain enqueues.

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
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
  if (!in) throw std::runtime_error(path + ": cannot open (build the plans with dfosd build DIR --backend tensorrt)");
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

// Contract dtype names (core/contracts.py DTYPES) -> TensorRT's.
nvinfer1::DataType trt_dtype(const std::string& dtype) {
  if (dtype == "uint8") return nvinfer1::DataType::kUINT8;
  if (dtype == "float16") return nvinfer1::DataType::kHALF;
  return nvinfer1::DataType::kFLOAT;  // the reader admits uint8, float16 and float32 only
}

std::string dtype_str(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kUINT8: return "uint8";
    default: return "TensorRT DataType " + std::to_string(static_cast<int>(t));
  }
}

std::string dims_str(const nvinfer1::Dims& dims) {
  std::string s = "[";
  for (int i = 0; i < dims.nbDims; ++i) s += (i ? ", " : "") + std::to_string(dims.d[i]);
  return s + "]";
}

struct Boundary {  // one tensor between parts: its size and device buffer
  size_t bytes = 0;
  void* device = nullptr;
};

class TensorRtEngine : public TileEngine {
 public:
  explicit TensorRtEngine(const ExportChain& chain) : chain_(chain) {
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed");
    const size_t n = chain_.parts.size();
    engines_.resize(n);
    contexts_.resize(n);
    int64_t activation_bytes = 0;
    for (size_t i = 0; i < n; ++i) {
      const Part& part = chain_.parts[i];
      const std::vector<char> blob = read_file(part.file);
      engines_[i].reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
      if (!engines_[i])
        throw std::runtime_error(part.file + ": TensorRT could not deserialize it (built for another TensorRT "
                                 "version or GPU? rebuild: dfosd build " + chain_.dir + " --backend tensorrt --force)");
      check_io(*engines_[i], part);
      activation_bytes = std::max<int64_t>(activation_bytes, engines_[i]->getDeviceMemorySizeV2());
    }
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (activation_bytes > 0) cuda_check(cudaMalloc(&activations_, activation_bytes), "cudaMalloc(activations)");
    for (auto& [name, b] : boundaries_) cuda_check(cudaMalloc(&b.device, b.bytes), "cudaMalloc(boundary)");
    for (size_t i = 0; i < n; ++i) {
      const Part& part = chain_.parts[i];
      contexts_[i].reset(
          engines_[i]->createExecutionContext(nvinfer1::ExecutionContextAllocationStrategy::kUSER_MANAGED));
      if (!contexts_[i]) throw std::runtime_error(part.file + ": createExecutionContext failed");
      contexts_[i]->setDeviceMemoryV2(activations_, activation_bytes);
      std::vector<std::string> names{part.input.name, part.output.name};
      if (part.nonfinite) names.push_back(part.nonfinite->name);
      for (const std::string& name : names)
        if (!contexts_[i]->setTensorAddress(name.c_str(), boundaries_.at(name).device))
          throw std::runtime_error(part.file + ": setTensorAddress(" + name + ") failed");
    }
    // The chain's ends are uint8 [batch, 3, tile, tile] -> [batch, 3, tile*scale, ...] (checked by the reader).
    const Boundary& lr = boundaries_.at(chain_.input().name);
    const Boundary& sr = boundaries_.at(chain_.output().name);
    cuda_check(cudaMallocHost(&host_in_, lr.bytes), "cudaMallocHost");
    cuda_check(cudaMallocHost(&host_out_, sr.bytes), "cudaMallocHost");
    for (const Part& part : chain_.parts)  // the non-finite flags come back beside the image
      if (part.nonfinite) {
        void* host = nullptr;
        cuda_check(cudaMallocHost(&host, boundaries_.at(part.nonfinite->name).bytes), "cudaMallocHost(flags)");
        host_flags_.push_back({&part, host});
      }
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
    for (auto& [part, host] : host_flags_) cudaFreeHost(host);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int tile() const override { return chain_.tile; }
  int batch() const override { return chain_.batch; }
  int scale() const override { return chain_.scale; }

  void run(const uint8_t* lr, int n, uint8_t* sr) override {
    const int batch = chain_.batch;
    if (n < 1 || n > batch) throw std::invalid_argument("tensorrt: tile count out of range");
    const Boundary& in = boundaries_.at(chain_.input().name);
    const Boundary& out = boundaries_.at(chain_.output().name);
    const size_t lr_tile = in.bytes / batch, sr_tile = out.bytes / batch;
    std::memcpy(host_in_, lr, lr_tile * n);
    if (n < batch) std::memset(static_cast<uint8_t*>(host_in_) + lr_tile * n, 0, lr_tile * (batch - n));
    if (!graph_exec_ && use_graph_) capture();
    if (graph_exec_) {
      cuda_check(cudaGraphLaunch(graph_exec_, stream_), "cudaGraphLaunch");
    } else {
      enqueue_step();
    }
    cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    for (const auto& [part, host] : host_flags_) {
      const std::string bad = nonfinite_message(*part, static_cast<const uint8_t*>(host), n);
      if (!bad.empty()) throw std::runtime_error(bad);
    }
    std::memcpy(sr, host_out_, sr_tile * n);
  }

  std::string describe() const override {
    return std::string("TensorRT ") + std::to_string(NV_TENSORRT_MAJOR) + "." + std::to_string(NV_TENSORRT_MINOR) +
           " plans (tile " + std::to_string(chain_.tile) + ", batch " + std::to_string(chain_.batch) + ", shared activations " +
           std::to_string(activation_bytes_ >> 20) + " MiB, " + (graph_exec_ ? "one CUDA graph" : "no CUDA graph") +
           ")";
  }

 private:
  // The engine's I/O tensors must be exactly the part's contract: one input, one output (and the
  // decoder's non-finite flag), same names, dtypes and static shapes. The reader already checked
  // that the contracts chain, so boundaries shared by two parts get one buffer.
  void check_io(const nvinfer1::ICudaEngine& engine, const Part& part) {
    const std::string contract = part.input.str() + " -> " + part.output.str() +
                                 (part.nonfinite ? ", " + part.nonfinite->str() : "");
    const int want_io = part.nonfinite ? 3 : 2;
    if (engine.getNbIOTensors() != want_io)
      throw std::runtime_error(part.file + ": has " + std::to_string(engine.getNbIOTensors()) +
                               " I/O tensors, its contract in " + kManifestName + " has " + std::to_string(want_io) +
                               " (" + contract + ")");
    for (int i = 0; i < engine.getNbIOTensors(); ++i) {
      const char* name = engine.getIOTensorName(i);
      const bool is_input = engine.getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      const bool is_flag = !is_input && part.nonfinite && part.nonfinite->name == name;
      const TensorSpec& want = is_input ? part.input : is_flag ? *part.nonfinite : part.output;
      const nvinfer1::Dims dims = engine.getTensorShape(name);
      const nvinfer1::DataType dtype = engine.getTensorDataType(name);
      bool same = want.name == name && dtype == trt_dtype(want.dtype) &&
                  dims.nbDims == static_cast<int>(want.shape.size());
      for (int d = 0; same && d < dims.nbDims; ++d) same = dims.d[d] == want.shape[d];
      if (!same)
        throw std::runtime_error(part.file + ": its " + (is_input ? "input" : "output") + " '" + name + "' " +
                                 dtype_str(dtype) + " " + dims_str(dims) + " is not the contract's " + want.str() + " (a plan of another export? rebuild: "
                                 "dfosd build " + chain_.dir + " --backend tensorrt --force)");
      size_t count = 1;
      for (int64_t d : want.shape) count *= static_cast<size_t>(d);
      boundaries_.emplace(want.name, Boundary{count * element_size(dtype), nullptr});
    }
  }

  void enqueue_step() {
    const Boundary& in = boundaries_.at(chain_.input().name);
    const Boundary& out = boundaries_.at(chain_.output().name);
    cuda_check(cudaMemcpyAsync(in.device, host_in_, in.bytes, cudaMemcpyHostToDevice, stream_), "copy in");
    for (size_t i = 0; i < contexts_.size(); ++i)
      if (!contexts_[i]->enqueueV3(stream_)) throw std::runtime_error("enqueueV3 failed for part " + std::to_string(i));
    cuda_check(cudaMemcpyAsync(host_out_, out.device, out.bytes, cudaMemcpyDeviceToHost, stream_), "copy out");
    for (const auto& [part, host] : host_flags_) {
      const Boundary& flags = boundaries_.at(part->nonfinite->name);
      cuda_check(cudaMemcpyAsync(host, flags.device, flags.bytes, cudaMemcpyDeviceToHost, stream_), "copy flags");
    }
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
  ExportChain chain_;
  std::vector<std::unique_ptr<nvinfer1::ICudaEngine>> engines_;
  std::vector<std::unique_ptr<nvinfer1::IExecutionContext>> contexts_;
  std::map<std::string, Boundary> boundaries_;
  void* activations_ = nullptr;
  int64_t activation_bytes_ = 0;
  void* host_in_ = nullptr;
  void* host_out_ = nullptr;
  std::vector<std::pair<const Part*, void*>> host_flags_;  // pinned copies of each part's non-finite flags
  cudaStream_t stream_ = nullptr;
  cudaGraphExec_t graph_exec_ = nullptr;
  bool use_graph_ = true;
};

}  // namespace

std::unique_ptr<TileEngine> make_tensorrt_engine(const ExportChain& chain) {
  return std::make_unique<TensorRtEngine>(chain);
}

}  // namespace dfosd
