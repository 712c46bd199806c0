// Argument checks of the bindings, and the cast of a data pointer handed over from Python.
// QK_REQUIRE is a macro, not a function taking the message: the message is only built
// when the check fails (built eagerly, the ~20 strings of one linear4 forward's checks are
// a measurable part of a one-row product: docs/design.md).
#pragma once
#include <stdexcept>
#include <string>

#define QK_REQUIRE(ok, msg)                                  \
  do {                                                       \
    if (!(ok)) throw std::invalid_argument(std::string(msg)); \
  } while (0)

#include <cstdint>

// A data pointer handed over from Python as an integer (tensor.data_ptr()).
template <class T>
inline T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
