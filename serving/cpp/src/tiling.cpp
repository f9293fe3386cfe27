#include "tiling.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace dfosd {

void check_tiling(const TilingConfig& c) {
  if (c.tile < 8) throw std::invalid_argument("tile " + std::to_string(c.tile) + " is too small (at least 8)");
  if (c.overlap < 0) throw std::invalid_argument("--overlap must not be negative");
  if (2 * c.overlap >= c.tile)
    throw std::invalid_argument("--overlap " + std::to_string(c.overlap) + " must be smaller than half of the tile " +
                                std::to_string(c.tile));
  if (c.batch < 1 || c.scale < 1) throw std::invalid_argument("batch and scale must be at least 1");
}

std::vector<int> axis_origins(int length, int tile, int stride) {
  if (length <= tile) return {0};
  std::vector<int> starts;
  for (int s = 0; s <= length - tile; s += stride) starts.push_back(s);
  if (starts.back() != length - tile) starts.push_back(length - tile);
  return starts;
}

namespace {

// 1.0 in the middle, raised-cosine ramps of `ramp` samples at both ends (see tiling.py _ramp_1d).
std::vector<double> ramp_1d(int size, int ramp) {
  std::vector<double> w(size, 1.0);
  const double pi = std::acos(-1.0);
  for (int i = 0; i < ramp; ++i) {
    const double up = 0.5 - 0.5 * std::cos(pi * (i + 0.5) / ramp);
    w[i] = up;
    w[size - 1 - i] = up;
  }
  return w;
}

}  // namespace

std::vector<float> blend_window(const TilingConfig& cfg) {
  const int size = cfg.tile * cfg.scale;
  const std::vector<double> w = ramp_1d(size, cfg.overlap * cfg.scale);
  std::vector<float> out(static_cast<size_t>(size) * size);
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) out[static_cast<size_t>(y) * size + x] = static_cast<float>(w[y] * w[x]);
  return out;
}

Image pad_to_tile(const Image& image, int tile) {
  // Bottom/right padding: reflect (repeatedly: one reflection adds at most size-1 pixels),
  // replicate when an axis is a single pixel. Rows first, then columns, as in tiling.py.
  Image cur = image;
  for (int axis = 0; axis < 2; ++axis) {
    int size = axis == 0 ? cur.height : cur.width;
    while (size < tile) {
      const int pad = size > 1 ? std::min(tile - size, size - 1) : tile - 1;
      Image next;
      next.height = axis == 0 ? cur.height + pad : cur.height;
      next.width = axis == 1 ? cur.width + pad : cur.width;
      next.chw.resize(static_cast<size_t>(3) * next.height * next.width);
      for (int c = 0; c < 3; ++c)
        for (int y = 0; y < next.height; ++y)
          for (int x = 0; x < next.width; ++x) {
            int sy = y, sx = x;
            int& s = axis == 0 ? sy : sx;
            if (s >= size) s = size > 1 ? 2 * (size - 1) - s : size - 1;
            next.at(c, y, x) = cur.at(c, sy, sx);
          }
      cur = std::move(next);
      size += pad;
    }
  }
  return cur;
}

Image upscale_tiled(const Image& image, TileEngine& engine, const TilingConfig& cfg) {
  check_tiling(cfg);
  const int s = cfg.scale, t = cfg.tile, st = t * s;
  const Image padded = (image.height < t || image.width < t) ? pad_to_tile(image, t) : image;
  const int ph = padded.height, pw = padded.width;
  std::vector<std::pair<int, int>> origins;
  for (int y : axis_origins(ph, t, cfg.stride()))
    for (int x : axis_origins(pw, t, cfg.stride())) origins.emplace_back(y, x);

  const std::vector<float> window = blend_window(cfg);
  const size_t oh = static_cast<size_t>(ph) * s, ow = static_cast<size_t>(pw) * s;
  std::vector<float> acc(3 * oh * ow, 0.0f), weight(oh * ow, 0.0f);
  const size_t lr_tile = static_cast<size_t>(3) * t * t, sr_tile = static_cast<size_t>(3) * st * st;
  std::vector<uint8_t> lr(lr_tile * cfg.batch), sr(sr_tile * cfg.batch);

  for (size_t i = 0; i < origins.size(); i += cfg.batch) {
    const int n = static_cast<int>(std::min<size_t>(cfg.batch, origins.size() - i));
    for (int k = 0; k < n; ++k) {
      const auto [y0, x0] = origins[i + k];
      uint8_t* dst = lr.data() + k * lr_tile;
      for (int c = 0; c < 3; ++c)
        for (int y = 0; y < t; ++y)
          for (int x = 0; x < t; ++x) dst[(static_cast<size_t>(c) * t + y) * t + x] = padded.at(c, y0 + y, x0 + x);
    }
    engine.run(lr.data(), n, sr.data());
    for (int k = 0; k < n; ++k) {
      const auto [y0, x0] = origins[i + k];
      const uint8_t* out = sr.data() + k * sr_tile;
      const size_t oy = static_cast<size_t>(y0) * s, ox = static_cast<size_t>(x0) * s;
      for (int c = 0; c < 3; ++c)
        for (int y = 0; y < st; ++y)
          for (int x = 0; x < st; ++x) {
            const float w = window[static_cast<size_t>(y) * st + x];
            const float v = static_cast<float>(out[(static_cast<size_t>(c) * st + y) * st + x]) * w;
            acc[(c * oh + oy + y) * ow + ox + x] += v;
          }
      for (int y = 0; y < st; ++y)
        for (int x = 0; x < st; ++x) weight[(oy + y) * ow + ox + x] += window[static_cast<size_t>(y) * st + x];
    }
  }

  Image result;
  result.height = image.height * s;
  result.width = image.width * s;
  result.chw.resize(static_cast<size_t>(3) * result.height * result.width);
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < result.height; ++y)
      for (int x = 0; x < result.width; ++x) {
        const size_t p = static_cast<size_t>(y) * ow + x;
        float v = std::nearbyint(acc[c * oh * ow + p] / weight[p]);  // half to even, as torch.round
        v = std::min(255.0f, std::max(0.0f, v));
        result.at(c, y, x) = static_cast<uint8_t>(v);
      }
  return result;
}

}  // namespace dfosd
