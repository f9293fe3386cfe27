// What dfosd_runner knows about an export directory: everything comes from its manifests.
//
// manifest.json (written by dfosd-export, read in Python by core/manifest.py ExportDir) holds one
// `components` entry per part and tile batch: {component, batch, onnx, contract: {inputs, outputs:
// [{name, dtype, shape}]}}, plus the export's `tile`, `batches` and `upscale`. The runner takes the
// parts of one tile batch, chains them by tensor (each part's output is the next part's input:
// same name, dtype and shape), and takes tile, batch and scale from the chain's two ends. Engine
// files come from the kind's own record: manifest.aoti.json (engines/aoti_build.py, one section
// per device naming each part's package) or <stem>.plan.json beside each TensorRT plan
// (engines/tensorrt_build.py). File names are spelled in core/vocab.py; the C++ copies below are
// checked against it by tests/test_serving_cpp.py.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace dfosd {

constexpr const char* kManifestName = "manifest.json";
constexpr const char* kAotiManifestName = "manifest.aoti.json";
constexpr const char* kPlanManifestSuffix = ".plan.json";
constexpr int64_t kManifestFormat = 2;      // core/manifest.py MANIFEST_FORMAT
constexpr int64_t kAotiFormat = 1;          // engines/aoti_build.py AOTI_FORMAT
constexpr int64_t kPlanFormat = 1;          // engines/tensorrt_common.py PLAN_FORMAT
constexpr const char* kNonFiniteName = "sr_nonfinite";  // core/vocab.py SR_NONFINITE

struct TensorSpec {
  std::string name;
  std::string dtype;  // uint8, float16 or float32 (core/contracts.py DTYPES)
  std::vector<int64_t> shape;

  bool operator==(const TensorSpec& o) const { return name == o.name && dtype == o.dtype && shape == o.shape; }
  bool operator!=(const TensorSpec& o) const { return !(*this == o); }
  std::string str() const;  // "latent float32 [2, 4, 8, 8]"
};

struct Part {
  std::string component;  // "encoder"
  std::string stem;       // "encoder_b2": the manifest's key, the stem of its files
  std::string onnx;       // its ONNX file's name (what a TensorRT plan must have been built from)
  TensorSpec input, output;
  // The decoder's second output (exports since the flag exists): uint8 [batch], 1 where a value
  // before the cast to uint8 was NaN or Inf. The engines fail such a tile instead of passing on
  // the black image the cast made of it.
  std::optional<TensorSpec> nonfinite;
  std::string file;       // the engine file to load (set by find_aoti_packages / find_tensorrt_plans)
};

struct ExportChain {
  std::string dir;
  std::string build_key;
  std::map<std::string, std::string> sha256;  // the export's recorded files (manifest `files`): name -> sha256
  int tile = 0, batch = 0, scale = 0;
  std::string color_fix = "none";  // the family's default (manifest.json family.color_fix)
  std::vector<int> batches;  // every tile batch the export has parts for, ascending
  std::vector<Part> parts;   // pipeline order
  std::map<std::string, std::string> built_on;  // the AOTI build's `system` (torch, device, cpu, ...)

  const TensorSpec& input() const { return parts.front().input; }    // uint8 [batch, 3, tile, tile]
  const TensorSpec& output() const { return parts.back().output; }   // uint8 [batch, 3, tile*scale, ...]
  std::string describe() const;  // one line per part: "encoder_b2: lr_image uint8 [...] -> latent float32 [...]"
};

// The message for tiles whose non-finite flag is set (`flags`: one byte per tile, `n` tiles).
// Empty when none is.
std::string nonfinite_message(const Part& part, const uint8_t* flags, int n);

// Reads DIR/manifest.json and the chain of tile batch `batch` (0: the largest the export has).
// Throws json::Error naming the file, the field and the fix.
ExportChain read_export(const std::string& dir, int batch);

// Part files given on the command line (component -> path) take precedence; the others are
// looked up in the kind's records and checked (present, recorded size, built from this export).
void find_aoti_packages(ExportChain& chain, const std::string& device,
                        const std::map<std::string, std::string>& given);
void find_tensorrt_plans(ExportChain& chain, const std::map<std::string, std::string>& given);

}  // namespace dfosd
