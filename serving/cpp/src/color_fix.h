// The colour fix of dfosd's runtime (dfosd/runtime/color_fix.py apply_color_fix), in C++.
//
// The same steps on the same libtorch kernels as the Python code, so the bytes are the same:
// the reference is torch's bicubic upsample of the LR image to the SR size, clamped to 0..255;
// adain gives each channel the reference's mean and population std (statistics reduced in
// float64, then float32, as in Python); wavelet adds the low band of a 5-level a-trous pyramid
// ([1,2,1]/4 per axis, replicate-padded, dilation 1..16) of (reference - SR); the result is
// rounded half-to-even and clamped. Built where libtorch is (the aoti kind); elsewhere only
// "none" is available and the runner says so.
#pragma once

#include <string>

#include "image_io.h"

namespace dfosd {

bool color_fix_known(const std::string& method);  // none, adain, wavelet (core/vocab.py COLOR_FIXES)
bool color_fix_built();                           // false: built without libtorch
// sr must be scale x lr; method "none" returns sr unchanged. Throws std::invalid_argument.
Image apply_color_fix(const Image& sr, const Image& lr, const std::string& method, int scale);

}  // namespace dfosd
