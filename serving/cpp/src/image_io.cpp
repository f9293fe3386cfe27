#include "image_io.h"

#include <cctype>
#include <cstdio>
#include <fstream>
#include <stdexcept>

namespace dfosd {
namespace {

// Next header token of a PPM: skips whitespace and '#' comments (allowed between tokens).
std::string next_token(std::istream& in, const std::string& path) {
  std::string token;
  int c;
  while ((c = in.get()) != EOF) {
    if (c == '#') {
      while ((c = in.get()) != EOF && c != '\n') {
      }
      continue;
    }
    if (std::isspace(c)) {
      if (!token.empty()) return token;
      continue;
    }
    token.push_back(static_cast<char>(c));
  }
  if (token.empty()) throw std::runtime_error(path + ": truncated PPM header");
  return token;
}

int header_int(std::istream& in, const std::string& path, const char* what) {
  const std::string token = next_token(in, path);
  try {
    size_t used = 0;
    const long v = std::stol(token, &used);
    if (used != token.size() || v <= 0 || v > (1L << 20)) throw std::out_of_range(what);
    return static_cast<int>(v);
  } catch (const std::exception&) {
    throw std::runtime_error(path + ": bad PPM " + what + " '" + token + "'");
  }
}

}  // namespace

Image read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  if (next_token(in, path) != "P6")
    throw std::runtime_error(path + ": not a binary PPM (P6); convert it first, e.g. with Pillow or ImageMagick");
  Image img;
  img.width = header_int(in, path, "width");
  img.height = header_int(in, path, "height");
  if (header_int(in, path, "maxval") != 255) throw std::runtime_error(path + ": only 8-bit PPM (maxval 255)");
  // next_token consumed exactly one whitespace byte after maxval: the pixel data starts here.
  std::vector<uint8_t> hwc(static_cast<size_t>(img.width) * img.height * 3);
  in.read(reinterpret_cast<char*>(hwc.data()), static_cast<std::streamsize>(hwc.size()));
  if (static_cast<size_t>(in.gcount()) != hwc.size()) throw std::runtime_error(path + ": truncated pixel data");
  img.chw.resize(hwc.size());
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x)
      for (int c = 0; c < 3; ++c) img.at(c, y, x) = hwc[(static_cast<size_t>(y) * img.width + x) * 3 + c];
  return img;
}

void write_ppm(const std::string& path, const Image& img) {
  std::vector<uint8_t> hwc(img.chw.size());
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x)
      for (int c = 0; c < 3; ++c) hwc[(static_cast<size_t>(y) * img.width + x) * 3 + c] = img.at(c, y, x);
  // A temporary name and a rename: an interrupted run never leaves a half-written image.
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error(tmp + ": cannot write");
    out << "P6\n" << img.width << " " << img.height << "\n255\n";
    out.write(reinterpret_cast<const char*>(hwc.data()), static_cast<std::streamsize>(hwc.size()));
    if (!out) throw std::runtime_error(tmp + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename the finished file into place");
  }
}

}  // namespace dfosd
