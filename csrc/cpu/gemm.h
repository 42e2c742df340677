// Row-major single-precision matrix product for the CPU attention tiles:
//   C (M x N) = alpha * op(A) op(B) + beta * C,   op(X) = X or X^T,   leading dimensions in elements.
// Uses the BLAS sgemm that torch's CPU library exports (MKL on x86 wheels) when present at load time, else a
// vectorisable loop nest.
#pragma once

#include <cstdint>

namespace metagpt_fast::cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// True when gemm runs the BLAS library's sgemm (reported by tests and benchmarks).
bool gemm_uses_blas();

// Makes the BLAS run single-threaded on this thread while in scope. Construct it inside each at::parallel_for
// worker: the kernels already use every core, and a BLAS that also threads each small tile product
// oversubscribes them (measured with MKL threading every tile product on 2 busy cores: attention fwd+bwd at
// B=4, H=8, N=1024 took 10-40 s instead of 0.7 s).
class SequentialBlas {
 public:
  SequentialBlas();
  ~SequentialBlas();
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace metagpt_fast::cpu
