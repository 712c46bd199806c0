// Golden-data I/O for the C-simulation testbenches. A case is a directory written by
// tests/test_hls_csim.py from the reference backend: raw little-endian arrays
// (<name>.bin) and meta.txt ("key value" per line).
#ifndef QK_TB_IO_H
#define QK_TB_IO_H

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace tb {

class Case {
 public:
  explicit Case(std::string dir) : dir_(std::move(dir)) {
    std::ifstream f(dir_ + "/meta.txt");
    if (!f) throw std::runtime_error("cannot read " + dir_ + "/meta.txt");
    std::string k, v;
    while (f >> k >> v) meta_[k] = v;
  }
  bool has(const std::string& k) const { return meta_.count(k) != 0; }
  int64_t i(const std::string& k) const { return std::stoll(get(k)); }
  double f(const std::string& k) const { return std::stod(get(k)); }
  bool exists(const std::string& name) const { return std::ifstream(path(name)).good(); }

  template <class T>
  std::vector<T> load(const std::string& name, int64_t expect = -1) const {
    std::ifstream in(path(name), std::ios::binary | std::ios::ate);
    if (!in) throw std::runtime_error("cannot read " + path(name));
    const std::streamsize bytes = in.tellg();
    if (bytes % std::streamsize(sizeof(T))) throw std::runtime_error(path(name) + ": size not a multiple of the type");
    std::vector<T> v(size_t(bytes / std::streamsize(sizeof(T))));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(v.data()), bytes);
    if (expect >= 0 && int64_t(v.size()) != expect)
      throw std::runtime_error(path(name) + ": expected " + std::to_string(expect) + " values, found " +
                               std::to_string(v.size()));
    return v;
  }

 private:
  std::string get(const std::string& k) const {
    auto it = meta_.find(k);
    if (it == meta_.end()) throw std::runtime_error(dir_ + "/meta.txt has no key " + k);
    return it->second;
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name + ".bin"; }
  std::string dir_;
  std::map<std::string, std::string> meta_;
};

// Bit-for-bit comparison (dequantization must equal the reference exactly).
inline bool same_bits(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    std::printf("%s: FAIL size %zu != %zu\n", what, got.size(), want.size());
    return false;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    uint32_t a, b;
    std::memcpy(&a, &got[i], 4);
    std::memcpy(&b, &want[i], 4);
    if (a != b) {
      std::printf("%s: FAIL element %zu: got %.9g (0x%08x), want %.9g (0x%08x)\n", what, i, got[i], a, want[i], b);
      return false;
    }
  }
  std::printf("%s: PASS (%zu values bit-exact)\n", what, got.size());
  return true;
}

// Elementwise |got - want| <= bound, the bound computed by the test (fp32 dot bound).
inline bool within(const char* what, const std::vector<float>& got, const std::vector<float>& want,
                   const std::vector<float>& bound) {
  if (got.size() != want.size() || got.size() != bound.size()) {
    std::printf("%s: FAIL sizes %zu/%zu/%zu\n", what, got.size(), want.size(), bound.size());
    return false;
  }
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(got[i]) - double(want[i]));
    if (!(err <= double(bound[i]))) {
      std::printf("%s: FAIL element %zu: got %.9g want %.9g (err %.3g > bound %.3g)\n", what, i, got[i], want[i], err,
                  double(bound[i]));
      return false;
    }
    if (bound[i] > 0) worst = std::max(worst, err / double(bound[i]));
  }
  std::printf("%s: PASS (%zu values, worst error %.3f of the bound)\n", what, got.size(), worst);
  return true;
}

}  // namespace tb

#endif  // QK_TB_IO_H
