// See ../README.md: names only, for c10d's ProcessGroupGloo.hpp (whose inline setTimeout names
// this member; the shim never calls it).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
