// Image files for dfosd_runner: binary PPM (P6, 8-bit RGB) only.
//
// Deliberately minimal: PPM is a header plus raw interleaved RGB bytes, so the runner needs no
// image library. Convert other formats outside (e.g. Pillow: Image.open(f).convert("RGB").save("x.ppm"),
// or ImageMagick: convert in.png out.ppm).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dfosd {

// uint8 RGB image stored planar, CHW (the layout the engines take: [3,H,W]).
struct Image {
  int height = 0;
  int width = 0;
  std::vector<uint8_t> chw;  // 3 * height * width

  uint8_t& at(int c, int y, int x) { return chw[(static_cast<size_t>(c) * height + y) * width + x]; }
  uint8_t at(int c, int y, int x) const { return chw[(static_cast<size_t>(c) * height + y) * width + x]; }
};

Image read_ppm(const std::string& path);             // throws std::runtime_error with the reason
void write_ppm(const std::string& path, const Image& image);  // writes path.tmp, then renames

}  // namespace dfosd
