// A small, strict JSON reader: just what dfosd_runner needs to read an export's manifests.
//
// Strict means RFC 8259 and nothing more: no comments, no trailing commas, no NaN/Infinity, no
// leading zeros, no control characters or invalid UTF-8 inside strings, no duplicate keys, nothing
// after the top-level value. dfosd's manifests are written by Python's json module, so anything
// else means a damaged or foreign file, and the runner says where (file:line:column) instead of
// guessing. Numbers keep their source text, so integers are read exactly (no round trip through
// double). Nesting is limited (kMaxDepth) so that a hostile file cannot exhaust the stack.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dfosd::json {

// Every problem with a JSON file: the message starts with the file's name.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kMaxDepth = 64;

class Value {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Type type = Type::kNull;
  bool boolean = false;
  std::string text;  // a string's characters (UTF-8), or a number's source text
  std::vector<Value> items;                             // an array's elements
  std::vector<std::pair<std::string, Value>> members;  // an object's members, in file order

  const Value* find(const std::string& key) const;  // an object's member, or nullptr
};

const char* type_name(Value::Type type);  // "an object", "a string", ... for messages

// Parses `text`; `source` names it in messages ("DIR/manifest.json:3:14: ...").
Value parse(const std::string& text, const std::string& source);
// Reads and parses a file; a missing or unreadable file is an Error naming it.
Value parse_file(const std::string& path);

// A value together with where it is (file and member path), so that every complaint about the
// manifest's content names the file and the field: "DIR/manifest.json: components.unet_b2.batch: ...".
class Field {
 public:
  Field(const Value& value, std::string file, std::string where = "")
      : value_(&value), file_(std::move(file)), where_(std::move(where)) {}

  const Value& value() const { return *value_; }
  const std::string& file() const { return file_; }
  const std::string& where() const { return where_; }

  bool has(const std::string& key) const;             // an object with this member
  Field operator[](const std::string& key) const;     // a required member of an object
  Field at(size_t index) const;                       // an element of an array
  size_t size() const;                                // elements of an array
  std::vector<std::string> keys() const;              // members of an object, in file order

  std::string str() const;         // a string
  int64_t integer() const;         // an integer number (no fraction, no exponent), exactly
  std::vector<int64_t> integers() const;  // an array of integers

  [[noreturn]] void fail(const std::string& problem) const;  // throws Error naming file and field

 private:
  const Value& expect(Value::Type type) const;
  const Value* value_;
  std::string file_;
  std::string where_;
};

}  // namespace dfosd::json
