// The ``metagpt_fast`` torch.library namespace and the Python module entry point of the extension.
//
// Each op's schema is declared beside its CPU kernel with TORCH_LIBRARY_FRAGMENT (csrc/cpu/<op>_cpu.cpp); CUDA
// kernels register for the same ops per dispatch key (csrc/attention/, csrc/positional/). Fake (meta) kernels and
// autograd formulas live in metagpt_fast/backends/compiled/<op>.py, which each fragment names with
// ``set_python_module`` so torch imports it when a fake kernel is needed. No pybind11: this file compiles in seconds.
#include <Python.h>
#include <torch/library.h>

// Owns the namespace: loading a second copy of the extension fails loudly instead of mixing kernels.
TORCH_LIBRARY(metagpt_fast, m) {}

// The module object of ``import metagpt_fast._C`` (or of the JIT build); the ops register as the library loads.
#define MGF_CONCAT_(a, b) a##b
#define MGF_CONCAT(a, b) MGF_CONCAT_(a, b)
PyMODINIT_FUNC MGF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "metagpt_fast compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
