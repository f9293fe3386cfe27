// dfosd_runner: upscale PPM images x4 with dfosd's exported parts, from C++.
//
//   dfosd_runner aoti     --engines DIR [--batch B] [--device cpu|cuda] [--overlap N] [--color-fix F] IN.ppm OUT.ppm ...
//   dfosd_runner tensorrt --engines DIR [--batch B] [--overlap N] [--color-fix F] IN.ppm OUT.ppm [IN OUT ...]
//   dfosd_runner aoti|tensorrt --engines DIR [--batch B] [--device D] --check
//
// Everything about the parts comes from the export directory's manifests (export_dir.h): the
// chain of parts and their tensors, tile, scale, the tile batches and the engine files. --batch
// picks one of the export's tile batches (default: the largest). --<part> FILE (e.g. --unet
// U.pt2) loads that part from another file, still checked against the part's contract in DIR.
// --check reads and checks the manifests and files for that kind, prints the chain and the files,
// and loads nothing (it works for a kind this binary was built without).
// The engines take fixed tiles; images of any size are tiled and blended like the Python runtime
// (tiling.h), then colour-fixed as dfosd-trt-run does (color_fix.h; --color-fix none|adain|wavelet,
// default the export family's). Images are binary PPM only (image_io.h).

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine.h"
#include "color_fix.h"
#include "export_dir.h"
#include "image_io.h"
#include "tiling.h"

namespace {

const char* kUsage =
    "usage: dfosd_runner aoti|tensorrt --engines DIR [--batch B] [--device cpu|cuda (aoti)] [--overlap N]\n"
    "                    [--<part> FILE ...] IN.ppm OUT.ppm [IN.ppm OUT.ppm ...]\n"
    "  DIR: a dfosd export directory; its manifest.json gives the parts, tensors, tile and scale,\n"
    "       manifest.aoti.json (aoti) or <part>_b<B>.plan.json (tensorrt) the engine files.\n"
    "  --batch B: one of the export's tile batches (default: the largest).\n"
    "  --color-fix none|adain|wavelet: as dfosd-trt-run (default: the export family's, from manifest.json).\n"
    "  --<part> FILE: load that part (encoder, unet, decoder) from FILE instead, against its contract in DIR.\n"
    "  --check: check the manifests and files for that kind, print the chain and the files, load nothing.\n"
    "engine kinds built into this binary:"
#ifdef DFOSD_WITH_AOTI
    " aoti"
#endif
#ifdef DFOSD_WITH_TENSORRT
    " tensorrt"
#endif
    "\n";

bool kind_built([[maybe_unused]] const std::string& kind) {
#ifdef DFOSD_WITH_AOTI
  if (kind == "aoti") return true;
#endif
#ifdef DFOSD_WITH_TENSORRT
  if (kind == "tensorrt") return true;
#endif
  return false;
}

struct Args {
  std::string kind;
  std::map<std::string, std::string> opts;
  std::vector<std::string> files;
  bool check = false;
};

Args parse(int argc, char** argv) {
  Args a;
  if (argc < 2) throw std::invalid_argument("no engine kind given");
  a.kind = argv[1];
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--check") {
      a.check = true;
    } else if (arg.rfind("--", 0) == 0) {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      if (!a.opts.emplace(arg.substr(2), argv[++i]).second) throw std::invalid_argument(arg + " is given twice");
    } else {
      a.files.push_back(arg);
    }
  }
  if (a.check && !a.files.empty()) throw std::invalid_argument("--check takes no image files");
  if (!a.check && (a.files.empty() || a.files.size() % 2)) throw std::invalid_argument("give pairs of IN.ppm OUT.ppm");
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

// Options that are not the runner's own name part files (checked against the export's parts).
std::map<std::string, std::string> part_files(const Args& a) {
  std::map<std::string, std::string> given;
  for (const auto& [name, value] : a.opts) {
    if (name == "engines" || name == "batch" || name == "overlap" || name == "color-fix" ||
        (name == "device" && a.kind == "aoti"))
      continue;
    if (name == "tile" || name == "scale")
      throw std::invalid_argument("--" + name + ": the " + name + " is read from the export's manifest.json; drop it");
    if (name == "device") throw std::invalid_argument("--device is an option of the aoti kind");
    given[name] = value;
  }
  return given;
}

dfosd::ExportChain read_chain(const Args& a) {
  const std::string dir = str_opt(a, "engines", "");
  if (dir.empty())
    throw std::invalid_argument("--engines DIR is needed: the export directory whose manifest.json holds the parts' "
                                "contracts (tile, batch, tensors)");
  const int batch = int_opt(a, "batch", 0);
  if (a.opts.count("batch") && batch < 1) throw std::invalid_argument("--batch must be at least 1");
  return dfosd::read_export(dir, batch);
}

// The export's chain of the chosen tile batch, with each part's engine file for the kind.
dfosd::ExportChain locate(const Args& a) {
  if (a.kind != "aoti" && a.kind != "tensorrt") throw std::invalid_argument("unknown engine kind '" + a.kind + "'");
  if (!a.check && !kind_built(a.kind))
    throw std::invalid_argument("engine kind '" + a.kind + "' is not built into this binary");
  const std::map<std::string, std::string> given = part_files(a);
  dfosd::ExportChain chain = read_chain(a);
  if (a.kind == "aoti") {
    const std::string device = str_opt(a, "device", "cpu");
    dfosd::find_aoti_packages(chain, device.substr(0, device.find(':')), given);  // "cuda:1" -> the cuda section
  } else {
    dfosd::find_tensorrt_plans(chain, given);
  }
  return chain;
}

std::unique_ptr<dfosd::TileEngine> make_engine(const Args& a, const dfosd::ExportChain& chain) {
  std::cerr << "dfosd_runner: " << chain.dir << ", tile batch " << chain.batch << ":\n" << chain.describe();
#ifdef DFOSD_WITH_AOTI
  if (a.kind == "aoti") return dfosd::make_aoti_engine(chain, str_opt(a, "device", "cpu"));
#endif
#ifdef DFOSD_WITH_TENSORRT
  if (a.kind == "tensorrt") return dfosd::make_tensorrt_engine(chain);
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
  std::string color_fix;
  try {
    args = parse(argc, argv);
    const dfosd::ExportChain chain = locate(args);
    if (args.check) {
      std::cout << chain.dir << ": tile " << chain.tile << ", batch " << chain.batch << ", scale " << chain.scale
                << " (the export's tile batches:";
      for (int b : chain.batches) std::cout << " " << b;
      std::cout << ")\n";
      for (const dfosd::Part& p : chain.parts)
        std::cout << "  " << p.stem << ": " << p.input.str() << " -> " << p.output.str() << "  " << p.file << "\n";
      return 0;
    }
    color_fix = str_opt(args, "color-fix", chain.color_fix);
    if (!dfosd::color_fix_known(color_fix))
      throw std::invalid_argument("--color-fix " + color_fix + ": use none, adain or wavelet");
    if (color_fix != "none" && !dfosd::color_fix_built())
      throw std::invalid_argument("colour fix '" + color_fix + "'" + (args.opts.count("color-fix") ? "" :
                                  " (the export family's default)") + " needs libtorch, and this dfosd_runner was "
                                  "built without it: pass --color-fix none, or build it where torch is found");
    engine = make_engine(args, chain);
    cfg.tile = engine->tile();
    cfg.batch = engine->batch();
    cfg.scale = engine->scale();
    cfg.overlap = int_opt(args, "overlap", cfg.tile / 4);
    dfosd::check_tiling(cfg);
  } catch (const std::invalid_argument& e) {  // the command line: show how it goes
    std::cerr << "dfosd_runner: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {  // the export or its engines: the message names the file and the fix
    std::cerr << "dfosd_runner: " << e.what() << "\n";
    return 2;
  }
  std::cerr << "dfosd_runner: " << engine->describe() << ", overlap " << cfg.overlap << ", colour fix " << color_fix
            << "\n";
  int failed = 0;
  for (size_t i = 0; i < args.files.size(); i += 2) {
    const std::string& in = args.files[i];
    const std::string& out = args.files[i + 1];
    try {
      const auto t0 = std::chrono::steady_clock::now();
      const dfosd::Image lr = dfosd::read_ppm(in);
      const dfosd::Image sr = dfosd::apply_color_fix(dfosd::upscale_tiled(lr, *engine, cfg), lr, color_fix, cfg.scale);
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
