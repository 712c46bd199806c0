// Argument checks of the bindings. A macro, not a function taking the message: the
// message is only built when the check fails (built eagerly, the ~20 strings of one
// linear4 forward's checks are a measurable part of a one-row product: docs/design.md).
#pragma once
#include <stdexcept>
#include <string>

#define QK_REQUIRE(ok, msg)                                  \
  do {                                                       \
    if (!(ok)) throw std::invalid_argument(std::string(msg)); \
  } while (0)
