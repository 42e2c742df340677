// Test-only entry points that run the CUDA attention kernels under the CPU emulation (attention_emulation.h).
//
// Not part of the extension (the build compiles csrc/**/*.cpp and *.cu only): tests/test_attention.py compiles
// this file with a host compiler and -DMGF_ATTENTION_EMULATION into a small shared library and calls it through
// ctypes on CPU tensors. The launch templates, tile choices and kernels are the ones the GPU runs.
#include "attention_launch.cuh"

namespace {

using metagpt_fast::attention::AttentionParams;
using metagpt_fast::attention::LaunchShape;
using metagpt_fast::attention::TensorStrides;

struct EmulatedLaunch {
  template <typename Kernel>
  int operator()(Kernel kernel, const LaunchShape& shape, const AttentionParams& p) const {
    namespace em = metagpt_fast::attention::emulation;
    em::launch(kernel, em::Dim3{shape.grid_x, shape.grid_y, shape.grid_z}, shape.threads, shape.shared_bytes, p);
    return 0;
  }
};

TensorStrides strides_at(const int64_t* s) { return TensorStrides{s[0], s[1], s[2]}; }

// sizes: B, Hq, Hk, Nq, Nk, D; window: left, right, bottom_right (null: unbounded, top-left).
AttentionParams base_params(const int* sizes, float scale, int causal, double dropout_p, const int64_t* seed,
                            const bool* mask, const int64_t* mask_strides, int shared_memory_per_sm, const int* window,
                            float softcap) {
  AttentionParams p;
  p.batch = sizes[0];
  p.heads_q = sizes[1];
  p.heads_k = sizes[2];
  p.n_q = sizes[3];
  p.n_k = sizes[4];
  p.head_dim = sizes[5];
  p.scale = scale;
  p.causal = causal != 0;
  p.mask = mask;
  if (mask != nullptr) {
    p.mask_stride_batch = mask_strides[0];
    p.mask_stride_head = mask_strides[1];
    p.mask_stride_q = mask_strides[2];
    p.mask_stride_k = mask_strides[3];
  }
  p.dropout = dropout_p > 0.0;
  p.dropout_threshold = metagpt_fast::dropout_threshold(dropout_p);
  p.dropout_scale = p.dropout ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 1.0f;
  p.seed = seed;
  p.shared_memory_per_sm = shared_memory_per_sm;
  if (window != nullptr) {
    p.window_left = window[0];
    p.window_right = window[1];
    p.bottom_right = window[2] != 0;
  }
  p.softcap = softcap;
  return p;
}

}  // namespace

extern "C" {

// strides: q, k, v, out (3 each: batch, head, row); mask_strides: 4 (batch, head, query, key); window: 3 ints
// (left, right, bottom_right) or null; softcap: 0 for none.
int mgf_emulated_attention_forward(int bf16, const void* q, const void* k, const void* v, void* out, float* lse,
                                   const bool* mask, const int64_t* strides, const int64_t* mask_strides,
                                   const int* sizes, float scale, int causal, double dropout_p, const int64_t* seed,
                                   int shared_memory_per_sm, const int* window, float softcap) {
  AttentionParams p = base_params(sizes, scale, causal, dropout_p, seed, mask, mask_strides, shared_memory_per_sm,
                                  window, softcap);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.lse = lse;
  p.q_strides = strides_at(strides);
  p.k_strides = strides_at(strides + 3);
  p.v_strides = strides_at(strides + 6);
  p.out_strides = strides_at(strides + 9);
  if (!metagpt_fast::attention::head_dim_supported(p.head_dim)) return -1;
  return bf16 ? metagpt_fast::attention::forward_any_head_dim<__nv_bfloat16>(p, EmulatedLaunch{})
              : metagpt_fast::attention::forward_any_head_dim<__half>(p, EmulatedLaunch{});
}

// strides: q, k, v, out, grad_out, grad_q, grad_k, grad_v (3 each); window and softcap as for the forward.
int mgf_emulated_attention_backward(int bf16, const void* grad_out, const void* q, const void* k, const void* v,
                                    const void* out, float* lse, const bool* mask, void* grad_q, void* grad_k,
                                    void* grad_v, float* delta, const int64_t* strides, const int64_t* mask_strides,
                                    const int* sizes, float scale, int causal, double dropout_p, const int64_t* seed,
                                    int shared_memory_per_sm, const int* window, float softcap) {
  AttentionParams p = base_params(sizes, scale, causal, dropout_p, seed, mask, mask_strides, shared_memory_per_sm,
                                  window, softcap);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = const_cast<void*>(out);
  p.lse = lse;
  p.grad_out = grad_out;
  p.grad_q = grad_q;
  p.grad_k = grad_k;
  p.grad_v = grad_v;
  p.delta = delta;
  p.q_strides = strides_at(strides);
  p.k_strides = strides_at(strides + 3);
  p.v_strides = strides_at(strides + 6);
  p.out_strides = strides_at(strides + 9);
  p.grad_out_strides = strides_at(strides + 12);
  p.grad_q_strides = strides_at(strides + 15);
  p.grad_k_strides = strides_at(strides + 18);
  p.grad_v_strides = strides_at(strides + 21);
  if (!metagpt_fast::attention::head_dim_supported(p.head_dim)) return -1;
  return bf16 ? metagpt_fast::attention::backward_any_head_dim<__nv_bfloat16>(p, EmulatedLaunch{})
              : metagpt_fast::attention::backward_any_head_dim<__half>(p, EmulatedLaunch{});
}

// Seed of the emulation's warp schedule (attention_emulation.h); every seed is a schedule a GPU may produce.
void mgf_emulation_set_seed(uint64_t seed) { metagpt_fast::attention::emulation::set_schedule_seed(seed); }

}  // extern "C"
