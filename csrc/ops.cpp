// Schemas of the native op pair and the Python module stub of clear_kernels._C.
//
// The schemas must match clear_kernels/ops.py (FWD_SCHEMA / BWD_SCHEMA); torch.library.opcheck in the tests
// exercises both against the fake implementations registered from Python. Kernels register themselves per
// dispatch key in their own files (cpu/, cuda/), so this file needs neither OpenMP nor CUDA.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing clear_kernels._C only has to load this shared library: the static TORCH_LIBRARY initialisers then
// register the ops. No Python functions are exported, so no pybind11.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(clear_kernels, m) {
  m.def(
      "native_fwd(Tensor q, Tensor k, Tensor v, Tensor segment, Tensor group, Tensor seg_start, "
      "Tensor seg_end, Tensor group_index, Tensor group_offsets, Tensor summary_index, "
      "Tensor summary_offsets, float scale, bool is_causal=False) -> (Tensor, Tensor)");
  m.def(
      "native_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor segment, "
      "Tensor group, Tensor seg_start, Tensor seg_end, Tensor group_index, Tensor group_offsets, "
      "Tensor summary_index, Tensor summary_offsets, float scale, bool is_causal=False) -> (Tensor, Tensor, Tensor)");
}
