// Errors raised by the Tactic core. Every failure derives from tactic::Error so that an
// embedding runtime can catch one type; the Python bindings map the subclasses onto
// ValueError / TypeError / RuntimeError.
#pragma once
#include <stdexcept>
#include <string>

namespace tactic {

// Base of every error the library throws.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A value, shape, layout or option is out of range (Python: ValueError).
struct ValueError : Error {
  using Error::Error;
};
// An argument has the wrong element type (Python: TypeError).
struct TypeError : Error {
  using Error::Error;
};
// The request does not fit the capacity fixed at construction (Python: tactic.CapacityError,
// a ValueError).
struct CapacityError : ValueError {
  using ValueError::ValueError;
};
// The operation is not available on this build or device (Python: RuntimeError).
struct UnsupportedError : Error {
  using Error::Error;
};

}  // namespace tactic
