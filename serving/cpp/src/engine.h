// The one thing dfosd_runner asks of an engine kind: upscale a batch of fixed-size LR tiles.
//
// Both kinds (AOTInductor packages, TensorRT plans) run the export's chain of parts (export_dir.h:
// encoder -> unet -> decoder, read from the manifest) on uint8 tiles [batch,3,tile,tile] -> uint8
// [batch,3,tile*scale,tile*scale], exactly like the Python runtime's OneStepRunner. Factories live
// in their own translation units so that main.cpp compiles without the heavy torch / TensorRT headers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "export_dir.h"

namespace dfosd {

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
// AOTInductor .pt2 packages (torch::inductor::AOTIModelPackageLoader). The loader does not expose
// the packages' shapes, so every part's output is checked against its contract as it comes back.
std::unique_ptr<TileEngine> make_aoti_engine(const ExportChain& chain, const std::string& device);
#endif

#ifdef DFOSD_WITH_TENSORRT
// TensorRT plans: each engine's I/O tensors are checked against its part's contract on loading;
// one activation buffer shared by the execution contexts; the whole step (copy in, one enqueue per
// part, copy out) in one CUDA graph.
std::unique_ptr<TileEngine> make_tensorrt_engine(const ExportChain& chain);
#endif

}  // namespace dfosd
