"""Matrix products called from inside Numba kernels: the gemm of the OpenBLAS that NumPy loaded.

Why: a kernel that alternates its own loops with matrix products (Winograd's transforms around its
16 or 36 products per block of tiles) either returns to Python for every product, or calls BLAS
itself. Returning to Python means two pools of threads that take turns, Numba's parallel loops
(GNU OpenMP's threads) and OpenBLAS's products, each waiting for its slowest thread, and the idle
pool's threads spinning on the cores the other needs (docs/threads.md). Calling gemm from the
kernel, single-threaded on each of the kernel's own threads, leaves one pool: each thread takes a
block of the work from its first loop through its products to its last loop, and the data of the
block stays in that core's cache.

How: ``gemm`` is a Numba intrinsic that declares the C function ``npanomaly_gemm_float32`` (or
``_float64``), the CBLAS interface with 64-bit integers:

    void f(int order, int trans_a, int trans_b, int64 m, int64 n, int64 k, T alpha, const T *a,
           int64 lda, const T *b, int64 ldb, T beta, T *c, int64 ldc)

and at import this module tells LLVM's linker where that name is (``llvmlite.binding.add_symbol``):
NumPy's OpenBLAS's ``scipy_cblas_sgemm64_`` (NumPy 2 wheels) or ``cblas_sgemm64_`` (NumPy 1.x
wheels). A kernel's compiled code refers to the name, not to an address, so it can be cached and
loaded by the next process, which registers the name again. Where no such OpenBLAS is loaded
(NumPy built on MKL or Accelerate, or OpenBLAS with 32-bit integers) the name points to a ctypes
callback that does the product with NumPy: correct, slower (it takes the GIL), and reported by
``BACKEND`` so that nn.Conv2d's "auto" choice keeps im2col there. ``NPANOMALY_BLAS=numpy`` forces
the callback (tests use it). The callers make OpenBLAS single-threaded around their parallel loops
(threads.single_threaded_blas), so that a product started on one of the loop's threads does not
start OpenBLAS's own threads too.
"""

import ctypes
import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from npanomaly import threads

from ._config import JIT_OPTIONS

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # the CBLAS enumerations
_SYMBOLS = {"float32": "npanomaly_gemm_float32", "float64": "npanomaly_gemm_float64"}
_C_TYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double}


def _prototype(c_type):
    i32, i64 = ctypes.c_int, ctypes.c_int64
    return ctypes.CFUNCTYPE(None, i32, i32, i32, i64, i64, i64, c_type, ctypes.c_void_p, i64, ctypes.c_void_p, i64,
                            c_type, ctypes.c_void_p, i64)


def _numpy_gemm(dtype):
    """The CBLAS gemm (row-major) as a ctypes callback on NumPy's matmul."""
    c_type = _C_TYPES[dtype]

    def view(address, rows, cols, stride):
        if rows == 0 or cols == 0:
            return np.zeros((rows, cols), dtype)
        flat = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(c_type)), shape=((rows - 1) * stride + cols,))
        return np.lib.stride_tricks.as_strided(flat, (rows, cols), (stride * flat.itemsize, flat.itemsize))

    def gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        a_matrix = view(a, k, m, lda).T if trans_a == TRANS else view(a, m, k, lda)
        b_matrix = view(b, n, k, ldb).T if trans_b == TRANS else view(b, k, n, ldb)
        product = alpha * (a_matrix @ b_matrix)
        out = view(c, m, n, ldc)
        out[...] = product if beta == 0.0 else product + beta * out  # beta = 0: c may hold anything

    return _prototype(c_type)(gemm)


def _openblas_gemm(dtype):
    """NumPy's OpenBLAS's CBLAS gemm with 64-bit integers, as a ctypes function, or None."""
    letter = "s" if dtype == "float32" else "d"
    numpy_dir = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    libraries = sorted(threads._openblas_libraries(), key=lambda lib: not lib._name.startswith(numpy_dir))
    for library in libraries:
        for name in (f"scipy_cblas_{letter}gemm64_", f"cblas_{letter}gemm64_"):
            function = getattr(library, name, None)
            if function is not None:
                return function
    return None


def _register():
    """Point the symbols at OpenBLAS's gemm, or at the NumPy callbacks; returns the backend's name."""
    backend = "openblas"
    for dtype, symbol in _SYMBOLS.items():
        function = None if os.environ.get("NPANOMALY_BLAS") == "numpy" else _openblas_gemm(dtype)
        if function is None:
            function = _CALLBACKS.setdefault(dtype, _numpy_gemm(dtype))  # kept alive: LLVM holds its address
            backend = "numpy"
        llvm.add_symbol(symbol, ctypes.cast(function, ctypes.c_void_p).value)
    return backend


_CALLBACKS = {}
#: "openblas" when the kernels' products run in NumPy's OpenBLAS, "numpy" for the slow callback.
BACKEND = _register()


@intrinsic
def _gemm(typingctx, a, b, c, transpose_a, transpose_b, beta):
    """c = op(a) @ op(b) + beta * c through the registered symbol; op(t) = t.T when its flag is set.
    a, b, c: 2-D arrays of one float dtype, C-contiguous or rows of a wider matrix (layout "A",
    such as u[:, lo:hi]; checked here, at compile time); their leading dimensions are their row
    strides. Neither their shapes nor a unit column stride are checked here (gemm does that):
    M, N come from c, K from a."""
    arrays = (a, b, c)
    if not all(isinstance(t, types.Array) and t.ndim == 2 and t.layout in ("C", "A") for t in arrays):
        return None
    if len({t.dtype for t in arrays}) != 1 or str(c.dtype) not in _SYMBOLS:
        return None
    dtype = c.dtype
    signature = types.void(a, b, c, types.boolean, types.boolean, types.float64)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        real = ir.FloatType() if str(dtype) == "float32" else ir.DoubleType()
        pointer = real.as_pointer()
        function_type = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, real, pointer, i64, pointer,
                                                        i64, real, pointer, i64])
        function = cgutils.get_or_insert_function(builder.module, function_type, _SYMBOLS[str(dtype)])
        a_array, b_array, c_array = (context.make_array(t)(context, builder, v)
                                     for t, v in zip(signature.args[:3], args[:3]))
        transpose_a, transpose_b = args[3], args[4]
        beta_value = context.cast(builder, args[5], types.float64, dtype)
        m, n = (builder.extract_value(c_array.shape, axis) for axis in (0, 1))
        a_rows, a_cols = (builder.extract_value(a_array.shape, axis) for axis in (0, 1))
        k = builder.select(transpose_a, a_rows, a_cols)
        one, itemsize = ir.Constant(i64, 1), ir.Constant(i64, context.get_abi_sizeof(context.get_data_type(dtype)))

        def leading_dimension(array):  # the row stride in elements; BLAS wants at least max(1, columns)
            rows, columns = (builder.extract_value(array.shape, axis) for axis in (0, 1))
            stride = builder.sdiv(builder.extract_value(array.strides, 0), itemsize)
            width = builder.select(builder.icmp_signed("<", columns, one), one, columns)
            # a single row may have any stride (NumPy gives it 0 or the row's length): use its width
            unit = builder.icmp_signed("<=", rows, one)
            return builder.select(builder.or_(unit, builder.icmp_signed("<", stride, width)), width, stride)

        lda, ldb, ldc = (leading_dimension(t) for t in (a_array, b_array, c_array))

        def flag(transpose):
            return builder.select(transpose, ir.Constant(i32, TRANS), ir.Constant(i32, NO_TRANS))

        builder.call(function, [ir.Constant(i32, ROW_MAJOR), flag(transpose_a), flag(transpose_b), m, n, k,
                                ir.Constant(real, 1.0), a_array.data, lda, b_array.data, ldb, beta_value,
                                c_array.data, ldc])
        return context.get_dummy_value()

    return signature, codegen


@njit(**JIT_OPTIONS)
def gemm(a, b, out, transpose_a=False, beta=0.0, transpose_b=False):
    """out = op(a) @ op(b) + beta * out, in place, with op(t) = t.T where its flag is set (BLAS's gemm).

    Shapes: op(a) [M, K], op(b) [K, N], out [M, N]; 2-D, one float dtype, each C-contiguous or a
    block of columns of a C-contiguous matrix (such as u[:, lo:hi], whose rows are u's). beta = 0
    ignores what out held (as BLAS does); beta = 1 accumulates into it. Serial: it runs on the
    calling thread, which is one thread of a kernel's parallel loop (OpenBLAS's own threads off,
    see threads.single_threaded_blas).
    The kernels pass every flag, as np.bool_(...) and np.float64(...): Numba compiles a function
    again for each literal argument (True, 1.0, 0) and each omitted default, so the six call sites
    would make four specialisations of gemm (and a literal 0 a second input_transform).
    """
    rows, inner = (a.shape[1], a.shape[0]) if transpose_a else (a.shape[0], a.shape[1])
    b_inner, columns = (b.shape[1], b.shape[0]) if transpose_b else (b.shape[0], b.shape[1])
    if b_inner != inner or out.shape[0] != rows or out.shape[1] != columns:
        raise ValueError("gemm: the shapes of a, b and out do not chain")
    if rows == 0 or columns == 0:
        return
    if inner == 0:  # no products to sum: BLAS would reject the leading dimensions
        if beta == 0.0:
            out[:] = 0.0
        else:
            out *= beta
        return
    if ((a.shape[1] > 1 and a.strides[1] != a.itemsize) or (b.shape[1] > 1 and b.strides[1] != b.itemsize)
            or (out.shape[1] > 1 and out.strides[1] != out.itemsize)):
        raise ValueError("gemm: a, b and out need contiguous rows")
    _gemm(a, b, out, transpose_a, transpose_b, beta)
