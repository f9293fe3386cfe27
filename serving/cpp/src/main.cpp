// dfosd_runner: upscale PPM images x4 with dfosd's exported parts, from C++.
//
//   dfosd_runner aoti     --encoder E.pt2  --unet U.pt2  --decoder D.pt2  --tile T --batch B
//                         [--scale 4] [--device cpu|cuda] [--overlap N] IN.ppm OUT.ppm [IN OUT ...]
//   dfosd_runner tensorrt --encoder E.plan --unet U.plan --decoder D.plan [--overlap N] IN.ppm OUT.ppm ...
//
// --engines DIR --batch B fills in the part files by dfosd's naming (DIR/encoder_bB.<device>.pt2,
// DIR/encoder_bB.plan, ...). The engines take fixed tiles; images of any size are tiled and
// blended like the Python runtime (tiling.h). Images are binary PPM only (image_io.h).

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"
#include "image_io.h"
#include "tiling.h"

namespace {

const char* kUsage =
    "usage: dfosd_runner aoti|tensorrt [--engines DIR --batch B | --encoder F --unet F --decoder F]\n"
    "                    [--tile T --batch B --scale 4 --device cpu|cuda  (aoti)] [--overlap N]\n"
    "                    IN.ppm OUT.ppm [IN.ppm OUT.ppm ...]\n"
    "engine kinds built into this binary:"
#ifdef DFOSD_WITH_AOTI
    " aoti"
#endif
#ifdef DFOSD_WITH_TENSORRT
    " tensorrt"
#endif
    "\n";

struct Args {
  std::string kind;
  std::map<std::string, std::string> opts;
  std::vector<std::string> files;
};

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) throw std::invalid_argument("no engine kind given");
  a.kind = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) == 0) {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      a.opts[arg.substr(2)] = argv[++i];
    } else {
      a.files.push_back(arg);
    }
  }
  if (a.files.empty() || a.files.size() % 2) throw std::invalid_argument("give pairs of IN.ppm OUT.ppm");
  return a;
}

int int_opt(const Args& a, const std::string& name, int fallback) {
  auto it = a.opts.find(name);
  if (it == a.opts.end()) return fallback;
  try {
    size_t used = 0;
    const int v = std::stoi(it->second, &used);
    if (used != it->second.size()) throw std::invalid_argument(name);
    return v;
  } catch (const std::exception&) {
    throw std::invalid_argument("--" + name + " " + it->second + ": not an integer");
  }
}

std::string str_opt(const Args& a, const std::string& name, const std::string& fallback) {
  auto it = a.opts.find(name);
  return it == a.opts.end() ? fallback : it->second;
}

dfosd::PartFiles part_files(const Args& a, const std::string& suffix) {
  dfosd::PartFiles f;
  const std::string dir = str_opt(a, "engines", "");
  const std::string b = std::to_string(int_opt(a, "batch", 1));
  auto path = [&](const std::string& part) {
    const std::string given = str_opt(a, part, "");
    if (!given.empty()) return given;
    if (dir.empty()) throw std::invalid_argument("give --" + part + " FILE, or --engines DIR");
    return dir + "/" + part + "_b" + b + suffix;
  };
  f.encoder = path("encoder");
  f.unet = path("unet");
  f.decoder = path("decoder");
  return f;
}

std::unique_ptr<dfosd::TileEngine> make_engine(const Args& a) {
#ifdef DFOSD_WITH_AOTI
  if (a.kind == "aoti") {
    const std::string device = str_opt(a, "device", "cpu");
    return dfosd::make_aoti_engine(part_files(a, "." + device + ".pt2"), int_opt(a, "tile", 0),
                                   int_opt(a, "batch", 1), int_opt(a, "scale", 4), device);
  }
#endif
#ifdef DFOSD_WITH_TENSORRT
  if (a.kind == "tensorrt") return dfosd::make_tensorrt_engine(part_files(a, ".plan"));
#endif
  throw std::invalid_argument("engine kind '" + a.kind + "' is not built into this binary");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
    std::cout << kUsage;
    return 0;
  }
  Args args;
  std::unique_ptr<dfosd::TileEngine> engine;
  dfosd::TilingConfig cfg;
  try {
    args = parse(argc, argv);
    engine = make_engine(args);
    cfg.tile = engine->tile();
    cfg.batch = engine->batch();
    cfg.scale = engine->scale();
    cfg.overlap = int_opt(args, "overlap", cfg.tile / 4);
    dfosd::check_tiling(cfg);
  } catch (const std::exception& e) {
    std::cerr << "dfosd_runner: " << e.what() << "\n" << kUsage;
    return 2;
  }
  std::cerr << "dfosd_runner: " << engine->describe() << ", overlap " << cfg.overlap << "\n";
  int failed = 0;
  for (size_t i = 0; i < args.files.size(); i += 2) {
    const std::string& in = args.files[i];
    const std::string& out = args.files[i + 1];
    try {
      const auto t0 = std::chrono::steady_clock::now();
      const dfosd::Image lr = dfosd::read_ppm(in);
      const dfosd::Image sr = dfosd::upscale_tiled(lr, *engine, cfg);
      dfosd::write_ppm(out, sr);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cerr << in << " (" << lr.width << "x" << lr.height << ") -> " << out << " (" << sr.width << "x"
                << sr.height << ") " << s << " s\n";
    } catch (const std::exception& e) {  // one bad file costs one line; the others go on
      std::cerr << "error: " << in << ": " << e.what() << "\n";
      ++failed;
    }
  }
  return failed ? 1 : 0;
}
