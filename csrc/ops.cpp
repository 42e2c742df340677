// The one place that declares the schemas of the package's torch.library ops (namespace ``metagpt_fast``).
//
// Kernels register per dispatch key elsewhere: csrc/cpu/ (CPU), csrc/positional/ (CUDA positional ops),
// csrc/attention/ (CUDA attention). Fake (meta) kernels and autograd formulas live in metagpt_fast/ops/cpp.py, which
// ``set_python_module`` names so torch imports it when a fake kernel is needed. Also defines the Python module
// entry point of the extension (no pybind11: this file compiles in seconds).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(metagpt_fast, m) {
  m.set_python_module("metagpt_fast.ops.cpp");

  // Flash attention. q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv); Hq % Hk == 0 (GQA: query head h reads
  // kv head h / (Hq / Hk)). attn_mask: bool (True = attend) or additive of q's dtype, broadcastable to
  // (B, Hq, Nq, Nk); never combined with is_causal (top-left alignment). seed: 1-element int64 (Philox key) iff
  // dropout_p > 0. out (B, Hq, Nq, Dv) of q's dtype; lse float32 (B, Hq, Nq), +inf for rows with no visible key.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? seed) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "float dropout_p, bool is_causal, float scale, Tensor? seed) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // dropout(weight[tokens] * scale + PE[offset : offset + T]): tokens (B, T) integer, weight (V, d); out (B, T, d)
  // of weight's dtype. Dropout offsets: (b * T + t) * d + j.
  m.def(
      "embed_positions_fwd(Tensor tokens, Tensor weight, float scale, SymInt offset, float dropout_p, "
      "bool sinusoidal, Tensor? seed) -> Tensor");
  // Gradient of the weight (num_embeddings, d), summed in float32 in token order (deterministic).
  m.def(
      "embed_positions_bwd(Tensor grad_out, Tensor tokens, SymInt num_embeddings, float scale, float dropout_p, "
      "Tensor? seed) -> Tensor");

  // dropout(x + PE[offset : offset + T]) for x (B, T, d); out of x's dtype.
  m.def("add_positional_encoding_fwd(Tensor x, SymInt offset, float dropout_p, Tensor? seed) -> Tensor");
  // grad_out * keep / (1 - p): the gradient of x (the encoding is a constant).
  m.def("add_positional_encoding_bwd(Tensor grad_out, float dropout_p, Tensor? seed) -> Tensor");

  // Rotary embedding of q (B, Hq, T, D) and k (B, Hk, T, D) over the first rotary_dim features; positions are
  // position_ids ((T,) or (1 | B, T)) or offset + t. conjugate=True rotates by -angle (the backward pass).
  m.def(
      "rotary(Tensor q, Tensor k, Tensor? position_ids, SymInt offset, int rotary_dim, float base, bool interleaved, "
      "bool conjugate) -> (Tensor q_out, Tensor k_out)");
  // In-place variant for inference (no autograd).
  m.def(
      "rotary_(Tensor(a!) q, Tensor(b!) k, Tensor? position_ids, SymInt offset, int rotary_dim, float base, "
      "bool interleaved) -> ()");
}

// The module object of ``import metagpt_fast._C`` (or of the JIT build); the ops register as the library loads.
#define MGF_CONCAT_(a, b) a##b
#define MGF_CONCAT(a, b) MGF_CONCAT_(a, b)
PyMODINIT_FUNC MGF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "metagpt_fast compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
