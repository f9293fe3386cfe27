// AOTInductor engine kind: the .pt2 packages written by `dfosd build --backend aoti`, run through
// libtorch's AOTIModelPackageLoader (the torch wheel ships the headers and libraries).
//
// Packages are tied to the torch version and device they were compiled for, like in Python
// (engines/aoti_build.py): the torch version and, on the CPU, the CPU model recorded in
// manifest.aoti.json are checked before loading (a CPU package is compiled with -march=native and
// may crash with an illegal instruction elsewhere); other mismatches fail inside the loader with
// torch's own message.

#include <ATen/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Device.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

#include <cctype>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "engine.h"

namespace dfosd {
namespace {

at::ScalarType scalar_type(const std::string& dtype) {
  if (dtype == "uint8") return at::kByte;
  if (dtype == "float16") return at::kHalf;
  return at::kFloat;  // the reader admits uint8, float16 and float32 only
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// The CPU's model name as core/manifest.py cpu_model() reads it; empty when /proc/cpuinfo is not there.
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::string lower = line;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (const char* key : {"model name", "cpu model", "hardware"})
      if (lower.rfind(key, 0) == 0 && line.find(':') != std::string::npos) return trim(line.substr(line.find(':') + 1));
  }
  return "";
}

void check_built_on(const ExportChain& chain, const std::string& device) {
  const std::string fix = "rebuild them here: dfosd build " + chain.dir + " --backend aoti --device " + device +
                          " --force";
  auto built = [&](const char* key) {
    auto it = chain.built_on.find(key);
    return it == chain.built_on.end() ? std::string() : it->second;
  };
  const std::string torch_here = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                                 "." + std::to_string(TORCH_VERSION_PATCH);
  const std::string torch_built = built("torch").substr(0, built("torch").find('+'));  // "2.13.0+cpu" -> "2.13.0"
  if (!torch_built.empty() && torch_built != torch_here)
    throw std::runtime_error("the " + device + " packages in " + chain.dir + " were built with torch " +
                             built("torch") + ", this runner is linked against libtorch " + torch_here + "; " + fix);
  const std::string cpu_here = device == "cpu" ? cpu_model() : "";
  if (!cpu_here.empty() && !built("cpu").empty() && built("cpu") != cpu_here)
    throw std::runtime_error("the cpu packages in " + chain.dir + " were built on CPU '" + built("cpu") +
                             "', this CPU is '" + cpu_here + "' (CPU packages are compiled with -march=native); " + fix);
}

class AotiEngine : public TileEngine {
 public:
  AotiEngine(const ExportChain& chain, const std::string& device) : chain_(chain), device_(device) {
    if (device_.type() != c10::DeviceType::CPU && device_.type() != c10::DeviceType::CUDA)
      throw std::invalid_argument("aoti: --device " + device + ": choose cpu or cuda");
    check_built_on(chain_, device_.is_cuda() ? "cuda" : "cpu");
    // run_single_threaded: one runner, no cross-call event bookkeeping (what the Python backend uses too).
    const c10::DeviceIndex index = device_.is_cuda() ? device_.index() : -1;
    for (const Part& part : chain_.parts)
      parts_.push_back(std::make_unique<torch::inductor::AOTIModelPackageLoader>(part.file, "model", true, 1, index));
    const TensorSpec& in = chain_.input();
    lr_ = at::empty(in.shape, at::TensorOptions().dtype(scalar_type(in.dtype)).device(device_));
    lr_.zero_();
  }

  int tile() const override { return chain_.tile; }
  int batch() const override { return chain_.batch; }
  int scale() const override { return chain_.scale; }

  void run(const uint8_t* lr, int n, uint8_t* sr) override {
    const int batch = chain_.batch, tile = chain_.tile;
    if (n < 1 || n > batch) throw std::invalid_argument("aoti: tile count out of range");
    at::Tensor host = at::from_blob(const_cast<uint8_t*>(lr), {n, 3, tile, tile}, at::kByte);
    lr_.narrow(0, 0, n).copy_(host);
    if (n < batch) lr_.narrow(0, n, batch - n).zero_();  // a partial batch: pad, ignore those outputs
    std::vector<at::Tensor> x{lr_};
    for (size_t i = 0; i < parts_.size(); ++i) {
      const Part& part = chain_.parts[i];
      std::vector<at::Tensor> y = parts_[i]->run(x);
      const size_t want = part.nonfinite ? 2 : 1;
      if (y.size() != want)
        throw std::runtime_error(part.file + ": returned " + std::to_string(y.size()) + " outputs, the contract has " +
                                 std::to_string(want));
      // The loader cannot tell a package's shapes up front: check each boundary as it comes back,
      // so a package built for another tile or batch is named instead of read out of bounds.
      if (y[0].scalar_type() != scalar_type(part.output.dtype) || y[0].sizes() != at::IntArrayRef(part.output.shape)) {
        std::ostringstream msg;
        msg << part.file << ": returned " << y[0].scalar_type() << " " << y[0].sizes() << ", its contract in "
            << kManifestName << " says " << part.output.str() << " (a package of another export? rebuild: dfosd "
            << "build " << chain_.dir << " --backend aoti --device " << (device_.is_cuda() ? "cuda" : "cpu")
            << " --force)";
        throw std::runtime_error(msg.str());
      }
      // A package may return its output in another memory layout (the tiny VAE encoder's latent
      // comes back channels_last), but the next package's kernels were compiled for contiguous
      // NCHW inputs and read raw memory: make every boundary contiguous, as the Python runner's
      // copies into its static buffers do.
      if (part.nonfinite) {
        at::Tensor flags = y[1].to(at::kCPU).to(at::kByte).contiguous();
        if (flags.numel() != batch)
          throw std::runtime_error(part.file + ": returned " + std::to_string(flags.numel()) + " " + kNonFiniteName +
                                   " flags, its contract says " + part.nonfinite->str());
        const std::string bad = nonfinite_message(part, flags.data_ptr<uint8_t>(), n);
        if (!bad.empty()) throw std::runtime_error(bad);
      }
      x = {y[0].contiguous()};
    }
    at::Tensor out = x[0].to(at::kCPU).contiguous();
    const size_t sr_tile = static_cast<size_t>(out.numel() / batch);
    std::memcpy(sr, out.data_ptr<uint8_t>(), static_cast<size_t>(n) * sr_tile);
  }

  std::string describe() const override {
    return "AOTInductor packages on " + device_.str() + " (tile " + std::to_string(chain_.tile) + ", batch " +
           std::to_string(chain_.batch) + ", scale " + std::to_string(chain_.scale) + ")";
  }

 private:
  ExportChain chain_;
  c10::Device device_;
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> parts_;
  at::Tensor lr_;  // the static input buffer, as OneStepRunner's
};

}  // namespace

std::unique_ptr<TileEngine> make_aoti_engine(const ExportChain& chain, const std::string& device) {
  return std::make_unique<AotiEngine>(chain, device);
}

}  // namespace dfosd
