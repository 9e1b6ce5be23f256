// backward_reduce_cuda for the transcendental activations (SiLU, GELU, ELU, Mish): backward_reduce.cu compiled
// as the op's other part (bnfused.h), so that a parallel build compiles the two halves of its kernels at once.
#define BNFUSED_CUDA_TRANSCENDENTAL_PART
#include "backward_reduce.cu"
