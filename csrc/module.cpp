// Python module shell for tokenbounds._C. The kernels register themselves with the torch
// dispatcher (TORCH_LIBRARY / TORCH_LIBRARY_FRAGMENT) when this library is loaded, so the module
// itself exposes nothing but a way to check which CPU features the kernels will use.
#include <Python.h>

#include "tokenbounds/cpu_features.h"

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(tokenbounds::cpu::isa_name(tokenbounds::cpu::detect_isa()));
}

static PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "SIMD instruction set the CPU kernels dispatch to."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
