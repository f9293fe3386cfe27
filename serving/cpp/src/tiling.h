// Tiling and blending, the same arithmetic as dfosd/runtime/tiling.py (upscale_tiled).
//
// Tiles start every (tile - overlap) LR pixels, the last one flush with the border; images
// smaller than a tile are reflect-padded (replicated on 1-pixel axes) and cropped back. Each
// output tile is weighted by a raised-cosine window (outer product of two 1-D ramps computed in
// double, stored as float), accumulated in float in tile order, divided by the summed weights and
// rounded half-to-even: the same operations in the same order as the Python runtime, so both give
// the same bytes for the same engine outputs (compile without FMA contraction: -ffp-contract=off).
#pragma once

#include <vector>

#include "engine.h"
#include "image_io.h"

namespace dfosd {

struct TilingConfig {
  int tile = 0;
  int overlap = 0;
  int batch = 1;
  int scale = 4;
  int stride() const { return tile - overlap; }
};

void check_tiling(const TilingConfig& cfg);  // throws std::invalid_argument, same rules as Python
std::vector<int> axis_origins(int length, int tile, int stride);
std::vector<float> blend_window(const TilingConfig& cfg);  // [tile*scale]^2, row-major
Image pad_to_tile(const Image& image, int tile);
Image upscale_tiled(const Image& image, TileEngine& engine, const TilingConfig& cfg);

}  // namespace dfosd
