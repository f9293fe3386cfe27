#include "export_dir.h"

#include "color_fix.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <sstream>
#include <utility>

#include "json.h"

namespace dfosd {
namespace fs = std::filesystem;
using json::Error;
using json::Field;

std::string TensorSpec::str() const {
  std::string s = name + " " + dtype + " [";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string ExportChain::describe() const {
  std::string s;
  for (const Part& p : parts) s += "  " + p.stem + ": " + p.input.str() + " -> " + p.output.str() + "\n";
  return s;
}

namespace {

std::string join(const std::string& dir, const std::string& name) { return (fs::path(dir) / name).string(); }

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=:+,@") ==
                        std::string::npos)
    return s;
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string bracketed(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

int positive_int(const Field& f) {
  const int64_t v = f.integer();
  if (v < 1 || v > (int64_t{1} << 24)) f.fail("expected a positive integer, found " + std::to_string(v));
  return static_cast<int>(v);
}

// A file name recorded in a manifest: a name inside the export directory, never a path out of it.
std::string plain_name(const Field& f) {
  const std::string name = f.str();
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
    f.fail("\"" + name + "\" is not a file name inside the export directory");
  return name;
}

TensorSpec read_spec(const Field& f, int batch) {
  TensorSpec s{f["name"].str(), f["dtype"].str(), f["shape"].integers()};
  static const std::set<std::string> kDtypes{"uint8", "float16", "float32"};  // core/contracts.py DTYPES
  if (!kDtypes.count(s.dtype)) f["dtype"].fail("\"" + s.dtype + "\" is not one of uint8, float16, float32");
  if (s.shape.empty() || std::any_of(s.shape.begin(), s.shape.end(), [](int64_t d) { return d < 1; }))
    f["shape"].fail("expected static positive dimensions");
  if (s.shape[0] != batch) f["shape"].fail("the first dimension must be the tile batch " + std::to_string(batch));
  return s;
}

// A part's contract: one input and one output (the runner chains single tensors), plus the
// decoder's optional non-finite flag (kNonFiniteName, uint8 [batch]) as a second output.
struct Contract {
  TensorSpec input, output;
  std::optional<TensorSpec> nonfinite;

  bool operator==(const Contract& o) const { return input == o.input && output == o.output && nonfinite == o.nonfinite; }
  bool operator!=(const Contract& o) const { return !(*this == o); }
};

Contract read_contract(const Field& contract, const std::string& component, int batch) {
  if (contract["component"].str() != component) contract["component"].fail("differs from the entry's component");
  if (contract["batch"].integer() != batch) contract["batch"].fail("differs from the entry's batch");
  if (contract["inputs"].size() != 1)
    contract["inputs"].fail("has " + std::to_string(contract["inputs"].size()) + " tensors; dfosd_runner chains "
                            "parts of one input and one output");
  const size_t outputs = contract["outputs"].size();
  if (outputs != 1 && outputs != 2)
    contract["outputs"].fail("has " + std::to_string(outputs) + " tensors; dfosd_runner chains parts of one input "
                             "and one output (and the decoder's " + kNonFiniteName + " flag)");
  Contract c{read_spec(contract["inputs"].at(0), batch), read_spec(contract["outputs"].at(0), batch), std::nullopt};
  if (outputs == 2) {
    TensorSpec flag = read_spec(contract["outputs"].at(1), batch);
    if (flag.name != kNonFiniteName || flag.dtype != "uint8" || flag.shape != std::vector<int64_t>{batch})
      contract["outputs"].at(1).fail("is " + flag.str() + "; a second output can only be " + kNonFiniteName +
                                     " uint8 [" + std::to_string(batch) + "]");
    c.nonfinite = flag;
  }
  return c;
}

// Orders the parts so that each one's output is the next one's input (name, dtype and shape).
std::vector<Part> chain_parts(std::vector<Part> parts, const std::string& where) {
  std::vector<Part> ordered;
  std::vector<std::string> heads;
  for (size_t i = 0; i < parts.size(); ++i) {
    const bool produced = std::any_of(parts.begin(), parts.end(),
                                      [&](const Part& q) { return &q != &parts[i] && q.output.name == parts[i].input.name; });
    if (!produced) heads.push_back(parts[i].stem);
  }
  if (heads.size() != 1) {
    std::string names;
    for (const auto& h : heads) names += (names.empty() ? "" : ", ") + h;
    throw Error(where + ": the parts do not form one chain (" +
                (heads.empty() ? std::string("no part takes an input that no other part produces")
                               : "several parts take an input no other part produces: " + names) + ")");
  }
  auto take = [&](auto it) {
    ordered.push_back(std::move(*it));
    parts.erase(it);
  };
  take(std::find_if(parts.begin(), parts.end(), [&](const Part& p) { return p.stem == heads[0]; }));
  while (!parts.empty()) {
    const Part& prev = ordered.back();
    auto next = std::find_if(parts.begin(), parts.end(), [&](const Part& p) { return p.input.name == prev.output.name; });
    if (next == parts.end()) {
      std::string left;
      for (const Part& p : parts) left += (left.empty() ? "" : ", ") + p.stem;
      throw Error(where + ": the chain breaks after " + prev.stem + ": its output " + prev.output.str() +
                  " is no other part's input (parts left over: " + left + ")");
    }
    if (next->input != prev.output)
      throw Error(where + ": " + prev.stem + " outputs " + prev.output.str() + " but " + next->stem + " takes " +
                  next->input.str() + ": each part's output must be the next part's input");
    take(next);
  }
  return ordered;
}

bool is_image(const TensorSpec& s, int batch, int side) {
  return s.dtype == "uint8" && s.shape == std::vector<int64_t>{batch, 3, side, side};
}

// A file recorded by its kind's manifest (`rec`: {bytes, sha256}): present, and of the recorded size.
// Sizes only: hashing multi-GB packages on every start would cost seconds (the Python runtime's
// quick check does the same for big files).
void check_size(const Field& rec, const std::string& path, const std::string& fix) {
  const int64_t bytes = rec["bytes"].integer();
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec || !fs::is_regular_file(path)) throw Error(path + ": missing (" + rec.file() + " lists it); " + fix);
  if (static_cast<int64_t>(size) != bytes)
    throw Error(path + ": changed since it was built (" + std::to_string(size) + " bytes, " + rec.file() +
                " records " + std::to_string(bytes) + "); " + fix);
}

void check_given(const ExportChain& chain, const std::map<std::string, std::string>& given) {
  for (const auto& [component, path] : given) {
    const bool known = std::any_of(chain.parts.begin(), chain.parts.end(),
                                   [&](const Part& p) { return p.component == component; });
    if (!known) {
      std::string names;
      for (const Part& p : chain.parts) names += (names.empty() ? "" : ", ") + p.component;
      throw Error("--" + component + " " + path + ": the export in " + chain.dir + " has no part '" + component +
                  "' (its parts: " + names + ")");
    }
  }
}

}  // namespace

ExportChain read_export(const std::string& dir, int batch) {
  const std::string path = join(dir, kManifestName);
  if (!fs::is_regular_file(path))
    throw Error(dir + " has no " + kManifestName + ": it is not a dfosd export directory (run dfosd-export --ckpt "
                "lora.safetensors --out DIR first and pass that DIR)");
  const json::Value doc = json::parse_file(path);
  const Field m(doc, path);
  if (m["format"].integer() != kManifestFormat)
    m["format"].fail("manifest format " + m["format"].value().text + "; this dfosd_runner reads " +
                     std::to_string(kManifestFormat) + " (re-run dfosd-export with the dfosd this runner came with)");
  ExportChain chain;
  chain.dir = dir;
  chain.build_key = m["build_key"].str();
  if (m.has("files")) {  // needed by the TensorRT kind only (find_tensorrt_plans)
    const Field files = m["files"];
    for (const std::string& name : files.keys()) chain.sha256[name] = files[name]["sha256"].str();
  }
  const int tile = positive_int(m["tile"]);
  const int scale = positive_int(m["upscale"]);

  const Field components = m["components"];
  std::map<int, std::vector<std::string>> stems;  // tile batch -> its parts' manifest keys
  for (const std::string& stem : components.keys()) stems[positive_int(components[stem]["batch"])].push_back(stem);
  if (stems.empty()) components.fail("lists no parts (an unfinished export? re-run dfosd-export)");
  for (const auto& [b, s] : stems) chain.batches.push_back(b);
  std::vector<int> listed;
  for (int64_t b : m["batches"].integers()) listed.push_back(static_cast<int>(b));
  std::sort(listed.begin(), listed.end());
  if (listed != chain.batches)
    m["batches"].fail("lists tile batches " + bracketed(listed) + " but components has parts for " + bracketed(chain.batches));

  chain.batch = batch == 0 ? chain.batches.back() : batch;
  if (!stems.count(chain.batch)) {
    throw Error(path + ": the export has no tile batch " + std::to_string(batch) + " (it has " + bracketed(chain.batches) +
                "); pass --batch " + std::to_string(chain.batches.back()) + ", or re-export with --batch " +
                std::to_string(batch));
  }
  std::vector<Part> parts;
  for (const std::string& stem : stems[chain.batch]) {
    const Field entry = components[stem];
    Part p;
    p.component = entry["component"].str();
    p.stem = stem;
    p.onnx = plain_name(entry["onnx"]);
    const Contract c = read_contract(entry["contract"], p.component, chain.batch);
    p.input = c.input;
    p.output = c.output;
    p.nonfinite = c.nonfinite;
    parts.push_back(std::move(p));
  }
  const std::string where = path + ": tile batch " + std::to_string(chain.batch);
  chain.parts = chain_parts(std::move(parts), where);
  if (!is_image(chain.input(), chain.batch, tile))
    throw Error(where + ": the chain starts with " + chain.input().str() + "; dfosd_runner feeds uint8 tiles [" +
                std::to_string(chain.batch) + ", 3, " + std::to_string(tile) + ", " + std::to_string(tile) +
                "] (tile " + std::to_string(tile) + ")");
  if (!is_image(chain.output(), chain.batch, tile * scale))
    throw Error(where + ": the chain ends with " + chain.output().str() + "; dfosd_runner expects uint8 tiles [" +
                std::to_string(chain.batch) + ", 3, " + std::to_string(tile * scale) + ", " +
                std::to_string(tile * scale) + "] (tile " + std::to_string(tile) + " x upscale " +
                std::to_string(scale) + ")");
  chain.tile = tile;
  chain.scale = scale;
  // The family's default colour fix (core/families.py; an export from before families: DFOSD, none).
  const json::Value* family = doc.find("family");
  if (family && family->type == json::Value::Type::kObject && family->find("color_fix")) {
    const json::Value* fix = family->find("color_fix");
    if (fix->type != json::Value::Type::kString || !color_fix_known(fix->text))
      m["family"]["color_fix"].fail("is not one of none, adain, wavelet (re-run dfosd-export)");
    chain.color_fix = fix->text;
  }
  return chain;
}

void find_aoti_packages(ExportChain& chain, const std::string& device,
                        const std::map<std::string, std::string>& given) {
  check_given(chain, given);
  const bool all_given = std::all_of(chain.parts.begin(), chain.parts.end(),
                                     [&](const Part& p) { return given.count(p.component) > 0; });
  if (all_given) {
    for (Part& p : chain.parts) p.file = given.at(p.component);
    return;
  }
  const std::string cmd = "dfosd build " + shell_quote(chain.dir) + " --backend aoti --device " + device;
  const std::string path = join(chain.dir, kAotiManifestName);
  if (!fs::is_regular_file(path))
    throw Error(chain.dir + " has no AOTInductor packages (no " + kAotiManifestName + "); build them: " + cmd);
  const json::Value doc = json::parse_file(path);
  const Field a(doc, path);
  if (a["format"].integer() != kAotiFormat)
    a["format"].fail("format " + a["format"].value().text + "; this dfosd_runner reads " + std::to_string(kAotiFormat) +
                     " (rebuild: " + cmd + " --force)");
  const Field builds = a["builds"];
  if (!builds.has(device)) {
    std::string have;
    for (const std::string& d : builds.keys()) have += (have.empty() ? "" : ", ") + d;
    throw Error(path + ": no packages for " + device + (have.empty() ? "" : " (it has packages for " + have + ")") +
                "; build them: " + cmd);
  }
  const Field build = builds[device];
  if (build["export_build_key"].str() != chain.build_key)
    build["export_build_key"].fail("the packages were built from an earlier export of this directory (its " +
                                   std::string(kManifestName) + " changed since); rebuild them: " + cmd + " --force");
  const Field system = build["system"];
  for (const std::string& key : system.keys())
    if (system[key].value().type == json::Value::Type::kString) chain.built_on[key] = system[key].str();
  const Field components = build["components"];
  for (Part& p : chain.parts) {
    if (given.count(p.component)) {
      p.file = given.at(p.component);
      continue;
    }
    if (!components.has(p.stem)) components.fail("has no package for " + p.stem + "; rebuild: " + cmd + " --force");
    const Field entry = components[p.stem];
    const Contract c = read_contract(entry["contract"], p.component, chain.batch);
    if (c != Contract{p.input, p.output, p.nonfinite})
      entry["contract"].fail("differs from " + std::string(kManifestName) + "'s (" + c.input.str() + " -> " + c.output.str() +
                             "); rebuild: " + cmd + " --force");
    const std::string name = plain_name(entry["package"]);
    const Field files = build["files"];
    if (!files.has(name)) files.fail("does not record " + name + "; rebuild: " + cmd + " --force");
    check_size(files[name], join(chain.dir, name), "rebuild: " + cmd + " --force");
    p.file = join(chain.dir, name);
  }
}

std::string nonfinite_message(const Part& part, const uint8_t* flags, int n) {
  std::string tiles;
  for (int i = 0; i < n; ++i)
    if (flags[i]) tiles += (tiles.empty() ? "" : ", ") + std::to_string(i);
  if (tiles.empty()) return "";
  return part.stem + " produced NaN or Inf before its uint8 cast (" + kNonFiniteName + ", tile " + tiles +
         " of this batch): the image would be black, so it is not written (an fp16 overflow? re-export with "
         "--precision fp32, or find where with dfosd verify --fp16-storage)";
}

void find_tensorrt_plans(ExportChain& chain, const std::map<std::string, std::string>& given) {
  check_given(chain, given);
  const std::string cmd = "dfosd build " + shell_quote(chain.dir) + " --backend tensorrt";
  for (Part& p : chain.parts) {
    if (given.count(p.component)) {
      p.file = given.at(p.component);
      continue;
    }
    const std::string record = join(chain.dir, p.stem + kPlanManifestSuffix);
    if (!fs::is_regular_file(record))
      throw Error(chain.dir + " has no TensorRT plan for " + p.stem + " (no " + p.stem + kPlanManifestSuffix +
                  "); build the plans: " + cmd);
    const json::Value doc = json::parse_file(record);
    const Field plan(doc, record);
    if (plan["format"].integer() != kPlanFormat)
      plan["format"].fail("format " + plan["format"].value().text + "; this dfosd_runner reads " +
                          std::to_string(kPlanFormat) + " (rebuild: " + cmd + " --force)");
    // The rule of engines/tensorrt_common.py plan_problems (the Python backend's and the Triton
    // repository's): the plan was built from exactly this export's ONNX files, by their hashes.
    if (plan["onnx"].str() != p.onnx)
      plan["onnx"].fail("the plan was built from " + plan["onnx"].str() + ", not " + p.onnx + "; rebuild: " + cmd);
    const Field built = plan["onnx_files"];
    std::map<std::string, std::string> from, exported;
    for (const std::string& name : built.keys()) from[name] = built[name]["sha256"].str();
    for (const std::string& name : {p.onnx, p.onnx + ".data"})
      if (chain.sha256.count(name)) exported[name] = chain.sha256.at(name);
    if (from != exported)
      built.fail("the plan was built from another " + p.onnx + " than this export's (its hashes differ); rebuild: " + cmd);
    const std::string name = plain_name(plan["plan"]);
    const std::string path = join(chain.dir, name);
    check_size(plan["plan_file"], path, "rebuild: " + cmd + " --force");
    p.file = path;
  }
}

}  // namespace dfosd
