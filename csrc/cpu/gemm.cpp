#include "gemm.h"

#include <algorithm>
#include <vector>

// Fortran BLAS entry point, weak: resolved from torch's CPU library if it exports one, else null (then the loop
// nest below runs). Called inside torch's OpenMP parallel regions, where MKL runs single-threaded.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak, visibility("default")));

// MKL's thread-local thread count (returns the previous one; 0 = follow the global setting), weak like sgemm_.
// The C entry point is MKL_Set_Num_Threads_Local (mkl_service.h maps mkl_set_num_threads_local to it by macro; the
// lower-case symbol is the Fortran interface, which takes a pointer).
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak, visibility("default")));

namespace metagpt_fast::cpu {

bool gemm_uses_blas() { return sgemm_ != nullptr; }

SequentialBlas::SequentialBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
}

SequentialBlas::~SequentialBlas() {
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
}

namespace {

// C = alpha * op(A) op(B) + beta * C with the innermost loop over contiguous columns of C (vectorised).
void gemm_loops(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  std::vector<float> bt;  // op(B) as a contiguous (k x n) panel
  const float* panel = b;
  int64_t ldp = ldb;
  if (trans_b) {
    bt.resize(static_cast<size_t>(k * n));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t p = 0; p < k; ++p) bt[p * n + j] = b[j * ldb + p];
    panel = bt.data();
    ldp = n;
  }
  for (int64_t i = 0; i < m; ++i) {
    float* crow = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(crow, crow + n, 0.0f);
    } else if (beta != 1.0f) {
      for (int64_t j = 0; j < n; ++j) crow[j] *= beta;
    }
    for (int64_t p = 0; p < k; ++p) {
      const float aip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      const float* brow = panel + p * ldp;
      for (int64_t j = 0; j < n; ++j) crow[j] += aip * brow[j];
    }
  }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
  if (sgemm_ == nullptr) {
    gemm_loops(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

}  // namespace metagpt_fast::cpu
