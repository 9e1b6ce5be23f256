// The kernel view of an input (N, C, S and the memory layout), torch-free so the CUDA kernel headers and their
// CPU emulation can share it with the op layer (bnfused.h).
#pragma once
#include <stdint.h>

namespace bnfused {

enum class Layout { ChannelsFirst, ChannelsLast };

struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  Layout layout;
};

}  // namespace bnfused
