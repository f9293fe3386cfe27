#include "json.h"

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace dfosd::json {
namespace {

class Parser {
 public:
  Parser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Value document() {
    skip_space();
    Value v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& problem) const { fail_at(pos_, problem); }

  [[noreturn]] void fail_at(size_t at, const std::string& problem) const {
    size_t line = 1, column = 1;
    for (size_t i = 0; i < at && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw Error(source_ + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + problem +
                " (not valid JSON)");
  }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }

  void skip_space() {
    while (!at_end() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  void expect_word(const char* word) {
    const std::string w(word);
    if (s_.compare(pos_, w.size(), w) != 0) fail("unexpected character '" + std::string(1, peek()) + "'");
    pos_ += w.size();
  }

  Value value(int depth) {
    if (depth >= kMaxDepth) fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
    if (at_end()) fail("unexpected end of file, expected a value");
    Value v;
    switch (peek()) {
      case '{': return object(depth);
      case '[': return array(depth);
      case '"':
        v.type = Value::Type::kString;
        v.text = string();
        return v;
      case 't':
        expect_word("true");
        v.type = Value::Type::kBool;
        v.boolean = true;
        return v;
      case 'f':
        expect_word("false");
        v.type = Value::Type::kBool;
        return v;
      case 'n':
        expect_word("null");
        return v;
      default:
        if (peek() == '-' || (peek() >= '0' && peek() <= '9')) return number();
        fail("unexpected character '" + std::string(1, peek()) + "', expected a value");
    }
  }

  Value object(int depth) {
    Value v;
    v.type = Value::Type::kObject;
    ++pos_;  // '{'
    skip_space();
    if (peek() == '}') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_space();
      if (peek() != '"') fail("expected a member name in double quotes");
      const size_t key_at = pos_;
      std::string key = string();
      if (v.find(key)) fail_at(key_at, "duplicate key \"" + key + "\"");
      skip_space();
      if (peek() != ':') fail("expected ':' after a member name");
      ++pos_;
      skip_space();
      Value member = value(depth + 1);
      v.members.emplace_back(std::move(key), std::move(member));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        skip_space();
        if (peek() == '}') fail("trailing comma before '}'");
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return v;
      }
      fail(at_end() ? "unexpected end of file inside an object" : "expected ',' or '}' in an object");
    }
  }

  Value array(int depth) {
    Value v;
    v.type = Value::Type::kArray;
    ++pos_;  // '['
    skip_space();
    if (peek() == ']') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_space();
      v.items.push_back(value(depth + 1));
      skip_space();
      if (peek() == ',') {
        ++pos_;
        skip_space();
        if (peek() == ']') fail("trailing comma before ']'");
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return v;
      }
      fail(at_end() ? "unexpected end of file inside an array" : "expected ',' or ']' in an array");
    }
  }

  Value number() {
    // -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (!at_end() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
      if (peek() >= '0' && peek() <= '9') fail("a number must not have leading zeros");
    } else if (digits() == 0) {
      fail("expected digits after '-'");
    }
    if (peek() == '.') {
      ++pos_;
      if (digits() == 0) fail("expected digits after the decimal point");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("expected digits in the exponent");
    }
    Value v;
    v.type = Value::Type::kNumber;
    v.text = s_.substr(start, pos_ - start);
    return v;
  }

  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("unexpected end of file in a \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<unsigned>(c - 'A' + 10);
      else fail("a \\u escape needs four hex digits");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  // One UTF-8 encoded character copied as is; overlong forms, surrogates and bytes past U+10FFFF refused.
  void utf8_char(std::string& out) {
    const auto lead = static_cast<unsigned char>(s_[pos_]);
    int extra = 0;
    unsigned code = 0, min = 0;
    if (lead >= 0xC2 && lead <= 0xDF) extra = 1, code = lead & 0x1F, min = 0x80;
    else if (lead >= 0xE0 && lead <= 0xEF) extra = 2, code = lead & 0x0F, min = 0x800;
    else if (lead >= 0xF0 && lead <= 0xF4) extra = 3, code = lead & 0x07, min = 0x10000;
    else fail("invalid UTF-8 in a string");
    if (pos_ + extra >= s_.size()) fail("invalid UTF-8 in a string (truncated character)");
    for (int i = 1; i <= extra; ++i) {
      const auto c = static_cast<unsigned char>(s_[pos_ + i]);
      if ((c & 0xC0) != 0x80) fail("invalid UTF-8 in a string");
      code = (code << 6) | (c & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) fail("invalid UTF-8 in a string");
    out.append(s_, pos_, extra + 1);
    pos_ += extra + 1;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (at_end()) fail("unexpected end of file inside a string");
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character inside a string (write it as an escape)");
      if (static_cast<unsigned char>(c) >= 0x80) {
        utf8_char(out);
        continue;
      }
      ++pos_;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_end()) fail("unexpected end of file in an escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xDC00 && code <= 0xDFFF) fail("a lone low surrogate in a \\u escape");
          if (code >= 0xD800 && code <= 0xDBFF) {  // a UTF-16 pair: the low half must follow
            if (s_.compare(pos_, 2, "\\u") != 0) fail("a high surrogate \\u escape without its low half");
            pos_ += 2;
            const unsigned low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("a high surrogate \\u escape without its low half");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail("unknown escape '\\" + std::string(1, e) + "' in a string");
      }
    }
  }

  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0;
};

}  // namespace

const Value* Value::find(const std::string& key) const {
  for (const auto& [k, v] : members)
    if (k == key) return &v;
  return nullptr;
}

const char* type_name(Value::Type type) {
  switch (type) {
    case Value::Type::kNull: return "null";
    case Value::Type::kBool: return "a boolean";
    case Value::Type::kNumber: return "a number";
    case Value::Type::kString: return "a string";
    case Value::Type::kArray: return "an array";
    case Value::Type::kObject: return "an object";
  }
  return "?";
}

Value parse(const std::string& text, const std::string& source) { return Parser(text, source).document(); }

Value parse_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw Error(path + ": read failed");
  return parse(text.str(), path);
}

// ---------------------------------------------------------------- Field

void Field::fail(const std::string& problem) const {
  throw Error(file_ + ": " + (where_.empty() ? "" : where_ + ": ") + problem);
}

const Value& Field::expect(Value::Type type) const {
  if (value_->type != type)
    fail(std::string("expected ") + type_name(type) + ", found " + type_name(value_->type));
  return *value_;
}

bool Field::has(const std::string& key) const {
  return value_->type == Value::Type::kObject && value_->find(key) != nullptr;
}

Field Field::operator[](const std::string& key) const {
  const Value* member = expect(Value::Type::kObject).find(key);
  if (!member) fail("has no \"" + key + "\"");
  return Field(*member, file_, where_.empty() ? key : where_ + "." + key);
}

Field Field::at(size_t index) const {
  const Value& v = expect(Value::Type::kArray);
  if (index >= v.items.size()) fail("has no element " + std::to_string(index));
  return Field(v.items[index], file_, where_ + "[" + std::to_string(index) + "]");
}

size_t Field::size() const { return expect(Value::Type::kArray).items.size(); }

std::vector<std::string> Field::keys() const {
  std::vector<std::string> out;
  for (const auto& [k, v] : expect(Value::Type::kObject).members) out.push_back(k);
  return out;
}

std::string Field::str() const { return expect(Value::Type::kString).text; }

int64_t Field::integer() const {
  const std::string& t = expect(Value::Type::kNumber).text;
  if (t.find_first_of(".eE") != std::string::npos) fail("expected an integer, found " + t);
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  if (errno == ERANGE || end != t.c_str() + t.size()) fail("integer " + t + " is out of range");
  return v;
}

std::vector<int64_t> Field::integers() const {
  std::vector<int64_t> out;
  for (size_t i = 0; i < size(); ++i) out.push_back(at(i).integer());
  return out;
}

}  // namespace dfosd::json
