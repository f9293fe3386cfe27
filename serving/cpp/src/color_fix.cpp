// See color_fix.h. Each line mirrors one line of dfosd/runtime/color_fix.py.
#include "color_fix.h"

#include <stdexcept>
#include <vector>

#ifdef DFOSD_WITH_TORCH
#include <ATen/ATen.h>
#endif

namespace dfosd {

bool color_fix_known(const std::string& method) {
  return method == "none" || method == "adain" || method == "wavelet";
}

#ifdef DFOSD_WITH_TORCH
namespace {

using Tensor = at::Tensor;
constexpr double kEps = 1e-5;  // _EPS
constexpr int kLevels = 5;     // wavelet_color_fix's levels

// _channel_stats: mean and population std per channel, reduced in float64, back in x's dtype.
std::pair<Tensor, Tensor> channel_stats(const Tensor& x) {
  const Tensor flat = x.flatten(2).to(at::kDouble);
  const Tensor mean = flat.mean({-1});
  const Tensor std = flat.std(std::vector<int64_t>{-1}, /*unbiased=*/false, /*keepdim=*/false);
  return {mean.to(x.scalar_type()).unsqueeze(-1).unsqueeze(-1), std.to(x.scalar_type()).unsqueeze(-1).unsqueeze(-1)};
}

Tensor adain(const Tensor& sr, const Tensor& ref) {
  const auto [sr_mean, sr_std] = channel_stats(sr);
  const auto [ref_mean, ref_std] = channel_stats(ref);
  return (sr - sr_mean) / (sr_std + kEps) * ref_std + ref_mean;
}

// _blur_axis: [1,2,1]/4 along dim (2: rows, 3: columns), taps `dilation` apart, replicate-padded.
Tensor blur_axis(const Tensor& x, int64_t dilation, int64_t dim) {
  const int64_t n = x.size(dim);
  const std::vector<int64_t> pad = dim == 2 ? std::vector<int64_t>{0, 0, dilation, dilation}
                                            : std::vector<int64_t>{dilation, dilation, 0, 0};
  const Tensor p = at::pad(x, pad, "replicate");  // F.pad(x, pad, mode="replicate")
  return (p.narrow(dim, 0, n) + p.narrow(dim, dilation, n) * 2 + p.narrow(dim, 2 * dilation, n)) / 4;
}

Tensor wavelet(const Tensor& sr, const Tensor& ref) {
  Tensor low = ref - sr;  // _low_band(ref - sr, levels)
  for (int i = 0; i < kLevels; ++i) low = blur_axis(blur_axis(low, int64_t{1} << i, 3), int64_t{1} << i, 2);
  return sr + low;
}

Tensor as_tensor(const Image& im) {
  return at::from_blob(const_cast<uint8_t*>(im.chw.data()), {3, im.height, im.width}, at::kByte);
}

}  // namespace

bool color_fix_built() { return true; }

Image apply_color_fix(const Image& sr, const Image& lr, const std::string& method, int scale) {
  if (!color_fix_known(method)) throw std::invalid_argument("unknown colour fix '" + method + "'");
  if (method == "none") return sr;
  if (sr.height != lr.height * scale || sr.width != lr.width * scale)
    throw std::invalid_argument("SR size is not scale x the LR size");
  // bicubic_reference: F.interpolate(size=..., mode="bicubic", align_corners=False), clamped (bicubic overshoots).
  const Tensor up = at::upsample_bicubic2d(as_tensor(lr).unsqueeze(0).to(at::kFloat), {sr.height, sr.width},
                                           /*align_corners=*/false, std::nullopt, std::nullopt);
  const Tensor ref = up[0].clamp(0.0, 255.0).unsqueeze(0);
  const Tensor x = as_tensor(sr).unsqueeze(0).to(at::kFloat);
  const Tensor fixed = method == "adain" ? adain(x, ref) : wavelet(x, ref);
  const Tensor out = at::round(fixed[0]).clamp_(0, 255).to(at::kByte).contiguous();
  Image result{sr.height, sr.width, {}};
  result.chw.assign(out.data_ptr<uint8_t>(), out.data_ptr<uint8_t>() + out.numel());
  return result;
}

#else

bool color_fix_built() { return false; }

Image apply_color_fix(const Image& sr, const Image&, const std::string& method, int) {
  if (!color_fix_known(method)) throw std::invalid_argument("unknown colour fix '" + method + "'");
  if (method != "none")
    throw std::invalid_argument("colour fix '" + method + "' needs libtorch, and this dfosd_runner was built without "
                                "it: pass --color-fix none, or build with torch found (see CMakeLists.txt)");
  return sr;
}

#endif

}  // namespace dfosd
