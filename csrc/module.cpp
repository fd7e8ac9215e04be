// Python module shell for tokenbounds._C. The kernels register themselves with the torch
// dispatcher when this library is loaded (schemas in csrc/ops.cpp), so the module itself exposes
// only two host-side helpers: which CPU features the kernels will use, and the per-call
// smoothing constants every backend of the smoothed-loss kernels receives.
#include <Python.h>

#include <vector>

#include "tokenbounds/cpu_features.h"
#include "tokenbounds/smoothed_loss.h"

static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(tokenbounds::cpu::isa_name(tokenbounds::cpu::detect_isa()));
}

// smoothing_constants(alphas, vocab_size) -> (log_keep, log_floor): two tuples of floats with
// log(1 - a) and log(a / V) (tokenbounds/smoothed_loss.h; -inf at a = 1 and a = 0).
static PyObject* smoothing_constants(PyObject*, PyObject* args) {
  PyObject* seq = nullptr;
  long long vocab = 0;
  if (!PyArg_ParseTuple(args, "OL", &seq, &vocab)) return nullptr;
  if (vocab < 1) {
    PyErr_SetString(PyExc_ValueError, "vocab_size must be >= 1");
    return nullptr;
  }
  PyObject* fast = PySequence_Fast(seq, "alphas must be a sequence of floats");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject* keep = PyTuple_New(n);
  PyObject* floor = PyTuple_New(n);
  if (keep == nullptr || floor == nullptr) goto fail;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const double a = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
    if (a == -1.0 && PyErr_Occurred()) goto fail;
    PyTuple_SET_ITEM(keep, i, PyFloat_FromDouble(tokenbounds::smoothing_log_keep(a)));
    PyTuple_SET_ITEM(floor, i, PyFloat_FromDouble(tokenbounds::smoothing_log_floor(a, static_cast<double>(vocab))));
  }
  Py_DECREF(fast);
  return Py_BuildValue("(NN)", keep, floor);
fail:
  Py_XDECREF(keep);
  Py_XDECREF(floor);
  Py_DECREF(fast);
  return nullptr;
}

static PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "SIMD instruction set the CPU kernels dispatch to."},
    {"smoothing_constants", smoothing_constants, METH_VARARGS,
     "smoothing_constants(alphas, vocab_size) -> (log(1 - a), log(a / V)) as two tuples of floats."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
