// The one thing dfosd_runner asks of an engine kind: upscale a batch of fixed-size LR tiles.
//
// Both kinds (AOTInductor packages, TensorRT plans) chain the three exported parts
// encoder -> unet -> decoder on uint8 tiles [batch,3,tile,tile] -> uint8 [batch,3,tile*scale,tile*scale],
// exactly like the Python runtime's OneStepRunner. Factories live in their own translation units
// so that main.cpp compiles without the heavy torch / TensorRT headers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace dfosd {

struct PartFiles {
  std::string encoder, unet, decoder;
};

class TileEngine {
 public:
  virtual ~TileEngine() = default;
  virtual int tile() const = 0;   // LR tile side
  virtual int batch() const = 0;  // tiles per run (static)
  virtual int scale() const = 0;  // output pixels per input pixel
  // lr: n <= batch() tiles, CHW each; sr: n output tiles. Entries n..batch()-1 are zero-padded inside.
  virtual void run(const uint8_t* lr, int n, uint8_t* sr) = 0;
  virtual std::string describe() const = 0;
};

#ifdef DFOSD_WITH_AOTI
// AOTInductor .pt2 packages (torch::inductor::AOTIModelPackageLoader). The packages do not
// record their shapes in a form the loader exposes, so tile and batch are given.
std::unique_ptr<TileEngine> make_aoti_engine(const PartFiles& files, int tile, int batch, int scale,
                                             const std::string& device);
#endif

#ifdef DFOSD_WITH_TENSORRT
// TensorRT plans: shapes come from the engines; one activation buffer shared by the three
// execution contexts; the whole step (copy in, three enqueues, copy out) in one CUDA graph.
std::unique_ptr<TileEngine> make_tensorrt_engine(const PartFiles& files);
#endif

}  // namespace dfosd
