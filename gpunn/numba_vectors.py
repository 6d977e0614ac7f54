"""The vectors the CPU single passes compute with: a Numba type for 16 lanes of a float, the operations on it, and
:class:`Rows`, several such vectors held as one value; and what both Numba kernels share besides (their disk cache,
read-only inputs, the L2 term).

LLVM's auto-vectorizer on the development machine (Intel Xeon, AVX-512) uses 256-bit registers (the CPU model
prefers them) and did not keep sums in registers across a loop (7 GFLOP/s). The kernels of :mod:`gpunn.numba_cpu` and
:mod:`gpunn.numba_narrow` are written with these explicit vectors instead: one LLVM vector value each, and operations
(load, store, fma, exp, ...) that LLVM lowers to AVX-512 instructions where the CPU has them, and to narrower ones
elsewhere. Indices are counted in elements from an array's start, with no wraparound or bounds check: the kernels'
callers check what they index with.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16  #: lanes of a vector


# --- vectors ------------------------------------------------------------------------------------------------------


class Vector(types.Type):
    """16 lanes of a float type, held as one LLVM vector value (<16 x float> or <16 x double>)."""

    def __init__(self, dtype: types.Float) -> None:
        self.dtype = dtype
        super().__init__(name=f"Vector{LANES}({dtype})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Vector) -> None:
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), LANES))


_I32 = ir.IntType(32)


def _element_pointer(context: Any, builder: Any, arrty: types.Array, arr: Any, index: Any, indexty: Any) -> Any:
    """Pointer to element ``index`` of the array's data, counted in elements from its start (no bounds check)."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, index, indexty, types.intp)])


def _splat(builder: Any, value: Any, vty: ir.VectorType) -> Any:
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), zeros)


def _as_vector(context: Any, builder: Any, value: Any, valuety: Any, vecty: Vector) -> Any:
    """A vector operand as is, or a scalar operand broadcast to every lane."""
    if isinstance(valuety, Vector):
        return value
    return _splat(builder, context.cast(builder, value, valuety, vecty.dtype), context.get_value_type(vecty))


def _vector_of(*tys: Any) -> Vector:
    return next(t for t in tys if isinstance(t, Vector))


def _bits(fty: ir.Type) -> int:
    return 64 if isinstance(fty, ir.DoubleType) else 32


def _llvm_intrinsic(builder: Any, name: str, vty: ir.Type, nargs: int) -> Any:
    suffix = f"v{LANES}f{_bits(vty.element)}" if isinstance(vty, ir.VectorType) else f"f{_bits(vty)}"
    fnty = ir.FunctionType(vty, [vty] * nargs)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.{suffix}")


@intrinsic
def vzero(typingctx: Any, like: Any) -> Any:
    """A vector of zeros in the dtype of the array ``like``."""
    vt = Vector(like.dtype)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(like), codegen


@intrinsic
def vload(typingctx: Any, A: Any, i: Any) -> Any:
    """A[i : i + 16] of a contiguous float array, i counted in elements from its start."""
    vt = Vector(A.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, A, args[0], args[1], i)
        vty = context.get_value_type(vt)
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=A.dtype.bitwidth // 8)

    return vt(A, i), codegen


@intrinsic
def vload_u8(typingctx: Any, A: Any, i: Any, like: Any) -> Any:
    """A[i : i + 16] of a uint8 array, converted to floats of the dtype of the array ``like``."""
    vt = Vector(like.dtype)

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, A, args[0], args[1], i)
        bytes16 = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), LANES).as_pointer()), align=1)
        return builder.uitofp(bytes16, context.get_value_type(vt))

    return vt(A, i, like), codegen


@intrinsic
def vstore(typingctx: Any, A: Any, i: Any, v: Any) -> Any:
    """A[i : i + 16] = v."""

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, A, args[0], args[1], i)
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=A.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(A, i, v), codegen


@intrinsic
def sget(typingctx: Any, A: Any, i: Any) -> Any:
    """A[i] of a contiguous array, i counted in elements from its start, with no wraparound or bounds check."""

    def codegen(context, builder, sig, args):
        return builder.load(_element_pointer(context, builder, A, args[0], args[1], i))

    return A.dtype(A, i), codegen


@intrinsic
def vfma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c with one rounding (llvm.fma, never contracted or split by the compiler); a scalar or a vector."""
    vt = _vector_of(b, c)

    def codegen(context, builder, sig, args):
        vty = context.get_value_type(vt)
        ops = [_as_vector(context, builder, v, t, vt) for v, t in zip(args, (a, b, c))]
        return builder.call(_llvm_intrinsic(builder, "fma", vty, 3), ops)

    return vt(a, b, c), codegen


def _binary(op: str) -> Any:
    def typer(typingctx: Any, a: Any, b: Any) -> Any:
        vt = _vector_of(a, b)

        def codegen(context, builder, sig, args):
            x, y = (_as_vector(context, builder, v, t, vt) for v, t in zip(args, (a, b)))
            return getattr(builder, op)(x, y)

        return vt(a, b), codegen

    return intrinsic(typer)


vadd = _binary("fadd")
vsub = _binary("fsub")
vdiv = _binary("fdiv")


@intrinsic
def vpositive(typingctx: Any, z: Any, v: Any) -> Any:
    """v where z > 0, else 0: relu(z) with v = z, and dA * relu'(z) with v = dA."""

    def codegen(context, builder, sig, args):
        positive = builder.fcmp_ordered(">", args[0], ir.Constant(args[0].type, None))
        return builder.select(positive, args[1], ir.Constant(args[1].type, None))

    return v(z, v), codegen


def _halves(builder: Any, x: Any, combine: Any) -> Any:
    """Combine a vector's lanes pairwise, halves first (a fixed order), down to lane 0."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
        x = combine(lo, hi)
    return builder.extract_element(x, ir.Constant(_I32, 0))


@intrinsic
def vsum(typingctx: Any, v: Any) -> Any:
    """The sum of the 16 lanes, in a fixed order."""

    def codegen(context, builder, sig, args):
        return _halves(builder, args[0], builder.fadd)

    return v.dtype(v), codegen


@intrinsic
def vmax(typingctx: Any, v: Any) -> Any:
    """The largest of the 16 lanes."""

    def codegen(context, builder, sig, args):
        return _halves(builder, args[0], lambda a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b))

    return v.dtype(v), codegen


@intrinsic
def vlane(typingctx: Any, v: Any, k: Any) -> Any:
    """Lane k of v."""

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], context.cast(builder, args[1], k, types.int32))

    return v.dtype(v, k), codegen


@intrinsic
def vadd_lane(typingctx: Any, v: Any, k: Any, x: Any) -> Any:
    """v with x added to lane k (dZ2 = P - onehot(y) is vadd_lane(P, y, -1))."""

    def codegen(context, builder, sig, args):
        lane = context.cast(builder, args[1], k, types.int32)
        value = builder.fadd(builder.extract_element(args[0], lane), context.cast(builder, args[2], x, v.dtype))
        return builder.insert_element(args[0], value, lane)

    return v(v, k, x), codegen


@intrinsic
def vfirst_max(typingctx: Any, v: Any, top: Any) -> Any:
    """The first lane equal to ``top`` (the argmax, as numpy.argmax breaks ties), or 16 if none is (NaN)."""

    def codegen(context, builder, sig, args):
        vty = args[0].type
        equal = builder.fcmp_ordered("==", args[0], _splat(builder, args[1], vty))
        bits = builder.zext(builder.bitcast(equal, ir.IntType(LANES)), ir.IntType(32))
        cttz = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_I32, ir.IntType(1)]),
                                              "llvm.cttz.i32")
        # bit 16 set, so that "no lane" counts 16 trailing zeros rather than an undefined result
        count = builder.call(cttz, [builder.or_(bits, ir.Constant(_I32, 1 << LANES)), ir.Constant(ir.IntType(1), 0)])
        return builder.sext(count, ir.IntType(64))

    return types.int64(v, top), codegen


# exp(r) on |r| <= ln(2)/2 by its Taylor series: degree 7 leaves 5e-9 relative (float32's ulp is 6e-8), degree 13
# leaves 4e-18 (float64's is 1.1e-16)
_EXP_DEGREE = {32: 7, 64: 13}
# the smallest argument whose exp is a normal number; below it the result is flushed to 0 (a softmax term of
# e^-87 or e^-708 against a largest term of 1)
_EXP_LOW = {32: -87.33654, 64: -708.3964}
_EXP_BIAS = {32: (127, 23, 254), 64: (1023, 52, 2046)}


def _exp(builder: Any, x: Any) -> Any:
    """exp of every lane of the vector value x: 2^k * exp(r) with x = k ln 2 + r, to within 1-2 ulp; 0 below the
    normal range, NaN for NaN. (No vector exp exists without Intel's SVML; LLVM would call expf once per lane.)"""
    vty = x.type
    bits = _bits(vty.element)
    ity = ir.VectorType(ir.IntType(bits), LANES)

    def const(value: float) -> Any:
        return ir.Constant(vty, [value] * LANES)

    low = const(_EXP_LOW[bits])
    clipped = builder.select(builder.fcmp_ordered("<", x, low), low, x)
    k = builder.call(_llvm_intrinsic(builder, "rint", vty, 1), [builder.fmul(clipped, const(1 / math.log(2)))])
    fma = _llvm_intrinsic(builder, "fma", vty, 3)
    # ln 2 in two parts, so that k * ln2_hi is exact and r keeps its low bits
    ln2_hi = float(np.float32(math.log(2))) if bits == 32 else 0.6931471803691238
    ln2_lo = math.log(2) - ln2_hi
    r = builder.call(fma, [k, const(-ln2_hi), clipped])
    r = builder.call(fma, [k, const(-ln2_lo), r])
    degree = _EXP_DEGREE[bits]
    poly = const(1 / math.factorial(degree))
    for n in range(degree - 1, -1, -1):
        poly = builder.call(fma, [poly, r, const(1 / math.factorial(n))])
    # 2^k from its exponent bits; k of a NaN is set to 0 first (a NaN converted to an integer is undefined)
    k = builder.select(builder.fcmp_unordered("uno", k, k), const(0.0), k)
    bias, shift, top = _EXP_BIAS[bits]
    exponent = builder.add(builder.fptosi(k, ity), ir.Constant(ity, [bias] * LANES))
    exponent = builder.select(builder.icmp_signed(">", exponent, ir.Constant(ity, [top] * LANES)),
                              ir.Constant(ity, [top] * LANES), exponent)
    scale = builder.bitcast(builder.shl(exponent, ir.Constant(ity, [shift] * LANES)), vty)
    result = builder.fmul(poly, scale)
    return builder.select(builder.fcmp_ordered("<", x, low), ir.Constant(vty, None), result)


@intrinsic
def vexp(typingctx: Any, v: Any) -> Any:
    """exp of every lane (see _exp)."""

    def codegen(context, builder, sig, args):
        return _exp(builder, args[0])

    return v(v), codegen


@intrinsic
def cttz(typingctx: Any, x: Any) -> Any:
    """The number of trailing zero bits of a nonzero uint64 (the lowest set bit's position)."""

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.int64(x), codegen


@njit
def clear(A):
    """Zero a contiguous array in place with an explicit loop (an array expression would be a parallel region)."""
    flat = A.reshape(-1)
    for i in range(flat.shape[0]):
        flat[i] = 0


def enable_cache(kernel: Any) -> None:
    """Cache the kernel's machine code on disk, where Numba finds a writable place: the package's __pycache__, or,
    when the package is installed read-only, the user-wide cache (Numba's _UserWideCacheLocator, under
    $XDG_CACHE_HOME or ~/.cache/numba). Where there is neither, the kernel is compiled in every process instead of
    failing at import, as ``@njit(cache=True)`` would.

    Numba keeps a cached kernel while the file that defines it is unchanged; a kernel here also inlines this
    module's operations, so the cache is made to depend on this file's contents too (an edit of an operation alone
    would otherwise leave every kernel running its old code). With Numba's compiler off (NUMBA_DISABLE_JIT=1) the
    kernel is a plain function, and there is nothing to cache."""
    if not hasattr(kernel, "enable_caching"):
        return
    try:
        kernel.enable_caching()
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return
    # Numba's IndexDataCacheFile compares this stamp with the one its index was written with (a private attribute,
    # there in the Numba versions gpunn supports; a test checks it works)
    cache_file = getattr(kernel._cache, "_cache_file", None)
    if hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = (cache_file._source_stamp, _THIS_SOURCE)


#: what this module's source holds, for the kernels' caches (see enable_cache)
_THIS_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@njit
def half_squares(W1, W2):
    """0.5 * (sum of W1's squares + sum of W2's squares), W1 (h, n0) and W2 (C, h), in float64: the L2 term of the
    kernels' loss (times l2). A chain of h * n0 dependent additions: call it only when l2 != 0."""
    h, n0 = W1.shape
    squares = 0.0
    for i in range(h):
        for p in range(n0):
            squares += W1[i, p] * W1[i, p]
        for k in range(W2.shape[0]):
            squares += W2[k, i] * W2[k, i]
    return 0.5 * squares


def is_ready(kernel: Any, signature: tuple[Any, ...]) -> bool:
    """Is ``kernel``'s variant for the argument types ``signature`` compiled in this process, or in its disk cache
    (where loading it takes a fraction of a second, against seconds to compile)?"""
    if signature in kernel.overloads:
        return True
    cache = kernel._cache  # Numba's FunctionCache, or a NullCache where no directory was writable
    if not hasattr(cache, "_index_key"):
        return False
    return cache._index_key(signature, kernel.targetctx.codegen()) in cache._cache_file._load_index()


def aligned_zeros(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """Zeros starting on a 64-byte boundary, a cache line. NumPy aligns to 16 bytes only, and a kernel's vector of
    16 float32 that starts elsewhere straddles two lines: two loads each, and a line that two threads write when
    their chunks' scratch meet. Measured on the narrow kernel's scratch (784-10-10, MNIST, 2 threads, warm steps
    interleaved): 15-20 % slower with every buffer 16 or 32 bytes past a boundary than on one."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    raw = np.zeros(size * dtype.itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset : offset + size * dtype.itemsize].view(dtype).reshape(shape)


def read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels' inputs always reach them as read-only arrays, so that writable and read-only
    inputs (NumPy arrays over a file's bytes are read-only) do not compile two variants."""
    view = a.view()
    view.flags.writeable = False
    return view


# --- rows: h vectors as one value ----------------------------------------------------------------------------------


class Rows(types.Type):
    """``count`` vectors of 16 lanes (one per hidden unit or class), one LLVM value ([count x <16 x float>]) that the
    compiler keeps in registers. The count is part of the type: :func:`rzero` and :func:`rsplat` take it from the
    length of a tuple argument (a tuple of h zeros), so a kernel compiles one variant per count."""

    def __init__(self, dtype: types.Float, count: int) -> None:
        self.dtype = dtype
        self.count = count
        super().__init__(name=f"Rows{count}x{LANES}({dtype})")


@register_model(Rows)
class _RowsModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Rows) -> None:
        vector = ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), LANES)
        super().__init__(dmm, fe_type, ir.ArrayType(vector, fe_type.count))


_I64 = ir.IntType(64)


def _unpack(builder: Any, value: Any, count: int) -> list[Any]:
    return [builder.extract_value(value, k) for k in range(count)]


def _pack(builder: Any, ty: Any, vectors: list[Any]) -> Any:
    value = ir.Constant(ty, ir.Undefined)
    for k, v in enumerate(vectors):
        value = builder.insert_value(value, v, k)
    return value


def _vector_pointer(builder: Any, element: Any, offset: int, vty: Any) -> Any:
    return builder.bitcast(builder.gep(element, [ir.Constant(_I64, offset)]), vty.as_pointer())


def _first_element(context: Any, builder: Any, arrty: types.Array, arr: Any) -> Any:
    """Pointer to the array's first element (for offsets known when the kernel compiles)."""
    return _element_pointer(context, builder, arrty, arr, ir.Constant(_I64, 0), types.int64)


def _scalar_row(builder: Any, ptr: Any, k: int, vty: Any) -> Any:
    """ptr[k] in every lane of a vector of type vty."""
    return _splat(builder, builder.load(builder.gep(ptr, [ir.Constant(_I64, k)])), vty)


def _fma(builder: Any, a: Any, b: Any, c: Any) -> Any:
    return builder.call(_llvm_intrinsic(builder, "fma", c.type, 3), [a, b, c])


@intrinsic
def rzero(typingctx: Any, like: Any, units: Any) -> Any:
    """len(units) vectors of zeros in the dtype of the array ``like``."""
    rt = Rows(like.dtype, units.count)

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(rt), None)

    return rt(like, units), codegen


@intrinsic
def rsplat(typingctx: Any, b: Any, units: Any) -> Any:
    """Row k: b[k] in every lane, for k < len(units) (b contiguous, counted from its start)."""
    rt = Rows(b.dtype, units.count)

    def codegen(context, builder, sig, args):
        start = _first_element(context, builder, b, args[0])
        vty = ir.VectorType(start.type.pointee, LANES)
        return _pack(builder, context.get_value_type(rt),
                     [_scalar_row(builder, start, k, vty) for k in range(rt.count)])

    return rt(b, units), codegen


def _rfma(multiplier: Any) -> Any:
    """An intrinsic (M, i, x, acc) -> acc, row k: acc[k] + multiplier(builder, M's element i, k, vector type) * x."""

    def typer(typingctx: Any, M: Any, i: Any, x: Any, acc: Any) -> Any:
        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, M, args[0], args[1], i)
            vx = args[2]
            rows = _unpack(builder, args[3], acc.count)
            return _pack(builder, args[3].type,
                         [_fma(builder, multiplier(builder, ptr, k, vx.type), vx, r) for k, r in enumerate(rows)])

        return acc(M, i, x, acc), codegen

    return intrinsic(typer)


def _vector_row(builder: Any, ptr: Any, k: int, vty: Any) -> Any:
    return builder.load(_vector_pointer(builder, ptr, k * LANES, vty), align=_bits(vty.element) // 8)


rfma_scalars = _rfma(_scalar_row)  #: row k: acc[k] + W[i + k] * x (W[i + k] in every lane)
rfma_vectors = _rfma(_vector_row)  #: row k: acc[k] + D[i + 16 k : i + 16 k + 16] * x


def _to_memory(add: bool) -> Any:
    def typer(typingctx: Any, acc: Any, A: Any, i: Any) -> Any:
        def codegen(context, builder, sig, args):
            ptr = _element_pointer(context, builder, A, args[1], args[2], i)
            align = A.dtype.bitwidth // 8
            for k, v in enumerate(_unpack(builder, args[0], acc.count)):
                row = _vector_pointer(builder, ptr, k * LANES, v.type)
                if add:
                    v = builder.fadd(builder.load(row, align=align), v)
                builder.store(v, row, align=align)
            return context.get_dummy_value()

        return types.none(acc, A, i), codegen

    return intrinsic(typer)


rstore = _to_memory(add=False)  #: A[i + 16 k : i + 16 k + 16] = acc[k]
radd_store = _to_memory(add=True)  #: A[i + 16 k : i + 16 k + 16] += acc[k]


@intrinsic
def rrelu(typingctx: Any, acc: Any, scale: Any, b: Any) -> Any:
    """Row k: relu(acc[k] * scale + b[k]) (Z1 from the sums over integer pixels: scale = 1/255)."""

    def codegen(context, builder, sig, args):
        rows = _unpack(builder, args[0], acc.count)
        vty = rows[0].type
        s = _splat(builder, context.cast(builder, args[1], scale, acc.dtype), vty)
        start = _first_element(context, builder, b, args[2])
        out = []
        for k, r in enumerate(rows):
            z = _fma(builder, r, s, _scalar_row(builder, start, k, vty))
            out.append(builder.select(builder.fcmp_ordered(">", z, ir.Constant(vty, None)), z, ir.Constant(vty, None)))
        return _pack(builder, args[0].type, out)

    return acc(acc, scale, b), codegen


@intrinsic
def rmatvec(typingctx: Any, W: Any, x: Any, out: Any) -> Any:
    """Row r: out[r] + sum_k W[r, k] x[k], k ascending (W: contiguous (out.count, x.count))."""

    def codegen(context, builder, sig, args):
        start = _first_element(context, builder, W, args[0])
        xs = _unpack(builder, args[1], x.count)
        vty = xs[0].type
        result = []
        for r, total in enumerate(_unpack(builder, args[2], out.count)):
            for k, xk in enumerate(xs):
                total = _fma(builder, _scalar_row(builder, start, r * x.count + k, vty), xk, total)
            result.append(total)
        return _pack(builder, args[2].type, result)

    return out(W, x, out), codegen


def _greater(builder: Any, a: Any, b: Any) -> Any:
    return builder.fcmp_ordered(">", a, b)


def _fold(combine: Any) -> Any:
    """An intrinsic that folds the rows of z into one vector, in order: combine(builder, so_far, row)."""

    def typer(typingctx: Any, z: Any) -> Any:
        def codegen(context, builder, sig, args):
            rows = _unpack(builder, args[0], z.count)
            total = rows[0]
            for r in rows[1:]:
                total = combine(builder, total, r)
            return total

        return Vector(z.dtype)(z), codegen

    return intrinsic(typer)


#: per lane, the largest row (rows compared in order, a later one taken only where it is greater)
rmax = _fold(lambda builder, top, r: builder.select(_greater(builder, r, top), r, top))
#: per lane, the sum of the rows, in order
rsum = _fold(lambda builder, total, r: builder.fadd(total, r))


@intrinsic
def rfirst_max(typingctx: Any, z: Any) -> Any:
    """Per lane, the number of the first row holding the largest value (as numpy.argmax breaks ties), as a float."""
    vt = Vector(z.dtype)

    def codegen(context, builder, sig, args):
        rows = _unpack(builder, args[0], z.count)
        vty = rows[0].type
        top, first = rows[0], ir.Constant(vty, None)
        for k, r in enumerate(rows[1:], start=1):
            greater = _greater(builder, r, top)
            first = builder.select(greater, ir.Constant(vty, [float(k)] * LANES), first)
            top = builder.select(greater, r, top)
        return first

    return vt(z), codegen


@intrinsic
def rexp_below(typingctx: Any, z: Any, top: Any) -> Any:
    """Row k: exp(z[k] - top)."""

    def codegen(context, builder, sig, args):
        return _pack(builder, args[0].type,
                     [_exp(builder, builder.fsub(r, args[1])) for r in _unpack(builder, args[0], z.count)])

    return z(z, top), codegen


@intrinsic
def rpick(typingctx: Any, z: Any, y: Any) -> Any:
    """Per lane, row y of z (y: row numbers as floats; 0 where y is no row's number)."""
    vt = Vector(z.dtype)

    def codegen(context, builder, sig, args):
        picked = ir.Constant(args[1].type, None)
        for k, r in enumerate(_unpack(builder, args[0], z.count)):
            hit = builder.fcmp_ordered("==", args[1], ir.Constant(args[1].type, [float(k)] * LANES))
            picked = builder.select(hit, r, picked)
        return picked

    return vt(z, y), codegen


@intrinsic
def rdeltas(typingctx: Any, e: Any, total: Any, y: Any) -> Any:
    """dZ2 of cross-entropy after softmax, row c: e[c] / total - (y == c), and 0 in lanes where y < 0 (no sample)."""

    def codegen(context, builder, sig, args):
        vty = args[1].type
        zero, one = ir.Constant(vty, None), ir.Constant(vty, [1.0] * LANES)
        present = builder.fcmp_ordered(">=", args[2], zero)
        out = []
        for c, ec in enumerate(_unpack(builder, args[0], e.count)):
            label = builder.fcmp_ordered("==", args[2], ir.Constant(vty, [float(c)] * LANES))
            d = builder.fsub(builder.fdiv(ec, args[1]), builder.select(label, one, zero))
            out.append(builder.select(present, d, zero))
        return _pack(builder, args[0].type, out)

    return e(e, total, y), codegen


@intrinsic
def rpositive(typingctx: Any, a: Any, g: Any) -> Any:
    """Row k: g[k] where a[k] > 0, else 0 (dZ1 = dA1 * relu'(Z1), from A1 = relu(Z1))."""

    def codegen(context, builder, sig, args):
        out = []
        for ak, gk in zip(_unpack(builder, args[0], a.count), _unpack(builder, args[1], g.count)):
            out.append(builder.select(_greater(builder, ak, ir.Constant(ak.type, None)), gk,
                                      ir.Constant(gk.type, None)))
        return _pack(builder, args[1].type, out)

    return g(a, g), codegen


@intrinsic
def radd_outer(typingctx: Any, G: Any, d: Any, a: Any) -> Any:
    """G[16 (c a.count + k) : ... + 16] += d[c] * a[k] for every row c of d and k of a (per-lane sums of dW2)."""

    def codegen(context, builder, sig, args):
        start = _first_element(context, builder, G, args[0])
        align = G.dtype.bitwidth // 8
        ds, as_ = _unpack(builder, args[1], d.count), _unpack(builder, args[2], a.count)
        for c, dc in enumerate(ds):
            for k, ak in enumerate(as_):
                ptr = _vector_pointer(builder, start, (c * a.count + k) * LANES, dc.type)
                builder.store(_fma(builder, dc, ak, builder.load(ptr, align=align)), ptr, align=align)
        return context.get_dummy_value()

    return types.none(G, d, a), codegen


def _where(predicate: str) -> Any:
    def typer(typingctx: Any, a: Any, b: Any, x: Any, y: Any) -> Any:
        vt = _vector_of(a, b, x, y)

        def codegen(context, builder, sig, args):
            va, vb, vx, vy = (_as_vector(context, builder, v, t, vt) for v, t in zip(args, (a, b, x, y)))
            return builder.select(builder.fcmp_ordered(predicate, va, vb), vx, vy)

        return vt(a, b, x, y), codegen

    return intrinsic(typer)


vwhere_eq = _where("==")  #: per lane, x where a == b, else y
vwhere_ge = _where(">=")  #: per lane, x where a >= b, else y


def _reduce64(name: str) -> Any:
    def typer(typingctx: Any, v: Any) -> Any:
        def codegen(context, builder, sig, args):
            wide = args[0]
            if _bits(wide.type.element) == 32:
                wide = builder.fpext(wide, ir.VectorType(ir.DoubleType(), LANES))
            return _halves(builder, wide, getattr(builder, name))

        return types.float64(v), codegen

    return intrinsic(typer)


vsum64 = _reduce64("fadd")  #: the sum of the lanes in float64, in a fixed order
vprod64 = _reduce64("fmul")  #: the product of the lanes in float64, in a fixed order
