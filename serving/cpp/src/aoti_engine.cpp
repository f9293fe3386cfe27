// AOTInductor engine kind: the three .pt2 packages written by `dfosd aoti-export`, run through
// libtorch's AOTIModelPackageLoader (the torch wheel ships the headers and libraries).
//
// Packages are tied to the torch version and device they were compiled for, like in Python
// (export/aoti.py); the loader fails with torch's own message on a foreign package.

#include <ATen/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Device.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstring>
#include <sstream>
#include <stdexcept>

#include "engine.h"

namespace dfosd {
namespace {

class AotiEngine : public TileEngine {
 public:
  AotiEngine(const PartFiles& files, int tile, int batch, int scale, const std::string& device)
      : tile_(tile), batch_(batch), scale_(scale), device_(device) {
    if (tile <= 0 || batch <= 0 || scale <= 0) throw std::invalid_argument("aoti: --tile, --batch and --scale are needed");
    // run_single_threaded: one runner, no cross-call event bookkeeping (what the Python backend uses too).
    const c10::DeviceIndex index = device_.type() == c10::DeviceType::CUDA ? device_.index() : -1;
    for (const std::string* path : {&files.encoder, &files.unet, &files.decoder})
      parts_.push_back(std::make_unique<torch::inductor::AOTIModelPackageLoader>(*path, "model", true, 1, index));
    lr_ = at::empty({batch_, 3, tile_, tile_}, at::TensorOptions().dtype(at::kByte).device(device_));
    lr_.zero_();
  }

  int tile() const override { return tile_; }
  int batch() const override { return batch_; }
  int scale() const override { return scale_; }

  void run(const uint8_t* lr, int n, uint8_t* sr) override {
    if (n < 1 || n > batch_) throw std::invalid_argument("aoti: tile count out of range");
    const int64_t st = int64_t{tile_} * scale_;
    at::Tensor host = at::from_blob(const_cast<uint8_t*>(lr), {n, 3, tile_, tile_}, at::kByte);
    lr_.narrow(0, 0, n).copy_(host);
    if (n < batch_) lr_.narrow(0, n, batch_ - n).zero_();  // a partial batch: pad, ignore those outputs
    std::vector<at::Tensor> x{lr_};
    for (auto& part : parts_) {
      std::vector<at::Tensor> y = part->run(x);
      if (y.size() != 1) throw std::runtime_error("aoti: a part returned " + std::to_string(y.size()) + " outputs");
      // A package may return its output in another memory layout (the tiny VAE encoder's latent
      // comes back channels_last), but the next package's kernels were compiled for contiguous
      // NCHW inputs and read raw memory: make every boundary contiguous, as the Python runner's
      // copies into its static buffers do.
      x = {y[0].contiguous()};
    }
    at::Tensor out = x[0].to(at::kCPU).contiguous();
    if (out.scalar_type() != at::kByte || out.dim() != 4 || out.size(0) != batch_ || out.size(1) != 3 ||
        out.size(2) != st || out.size(3) != st) {
      std::ostringstream msg;
      msg << "aoti: the decoder returned " << out.sizes() << " " << out.scalar_type() << ", expected uint8 ["
          << batch_ << ", 3, " << st << ", " << st << "] (are --tile/--batch/--scale those of the packages?)";
      throw std::runtime_error(msg.str());
    }
    std::memcpy(sr, out.data_ptr<uint8_t>(), static_cast<size_t>(n) * 3 * st * st);
  }

  std::string describe() const override {
    return "AOTInductor packages on " + device_.str() + " (tile " + std::to_string(tile_) + ", batch " +
           std::to_string(batch_) + ")";
  }

 private:
  int tile_, batch_, scale_;
  c10::Device device_;
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> parts_;
  at::Tensor lr_;  // the static input buffer, as OneStepRunner's
};

}  // namespace

std::unique_ptr<TileEngine> make_aoti_engine(const PartFiles& files, int tile, int batch, int scale,
                                             const std::string& device) {
  return std::make_unique<AotiEngine>(files, tile, batch, scale, device);
}

}  // namespace dfosd
