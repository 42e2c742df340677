// Portability macros for code shared by the C++ CPU kernels and the CUDA kernels.
//
// Headers in this folder hold the math both kernel families run (Philox dropout, online-softmax update, sinusoid
// frequencies, rotary pair rotation). They include no torch header, so .cu files stay cheap to compile, and the
// C++ CPU kernels call the same functions: the CPU tests exercise the CUDA math.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MGF_HOST_DEVICE __host__ __device__
#define MGF_DEVICE __device__
#define MGF_INLINE __forceinline__
#else
#define MGF_HOST_DEVICE
#define MGF_DEVICE
#define MGF_INLINE inline
#endif

#if defined(__CUDA_ARCH__)
#define MGF_ON_DEVICE 1
#else
#define MGF_ON_DEVICE 0
#endif
