"""Explicit 16-lane SIMD values for numba kernels.

LLVM's loop vectorizer only vectorizes innermost loops and gives up on the nested, unrolled loops a
blocked INT4 kernel needs (measured: 1-8 GB/s). These intrinsics let a kernel say exactly what it
wants: f32v / i32v are LLVM <16 x float> / <16 x i32> values that live in registers across loop
iterations. The IR is portable (no target-specific intrinsics): on AVX-512 one value is one zmm
register, on AVX2 LLVM splits it into two ymm operations, elsewhere into whatever the target has.

Memory access: loads/stores take a C-contiguous array and a FLAT element index and do no bounds
checking; the caller guarantees idx .. idx+15 are inside the array. `prefetch` may take any index.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, register_model

W = 16  # lanes


class Vec(types.Type):
    def __init__(self, kind):
        self.kind = kind
        super().__init__(name=f"{kind}x{W}")


f32v = Vec("f32")
i32v = Vec("i32")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        elt = ir.FloatType() if fe_type.kind == "f32" else ir.IntType(32)
        super().__init__(dmm, fe_type, ir.VectorType(elt, W))


_F = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F, W)
_VI = ir.VectorType(_I32, W)


def _ptr(context, builder, arrty, arr, idx, idxty):
    ary = context.make_array(arrty)(context, builder, arr)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(ary.data, [i], inbounds=True)


def _check_arr(arr, dtypes):
    return isinstance(arr, types.Array) and arr.layout == "C" and arr.dtype in dtypes


def _vload(builder, ptr, elt, n=W):
    vt = ir.VectorType(elt, n)
    return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=1)


def _make_load(dtypes, elt, vec, doc):
    """16 lanes of `elt` from a C-contiguous array of one of `dtypes` at a flat index."""
    @intrinsic
    def _load(typingctx, arr, idx):
        if not (_check_arr(arr, dtypes) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            return _vload(builder, _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]), elt)

        return vec(arr, idx), codegen

    _load.__doc__ = doc
    return _load


load_f32 = _make_load((types.float32,), _F, f32v, "16 float32 from a C-contiguous float32 array at flat index idx.")
load_i32 = _make_load((types.int32, types.uint32), _I32, i32v, "16 int32 (raw bits) from an int32/uint32 array.")


def _make_ext_load(src_dtype, bits, signed):
    @intrinsic
    def _load(typingctx, arr, idx):
        if not (_check_arr(arr, (src_dtype,)) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = _vload(builder, p, ir.IntType(bits))
            return builder.sext(v, _VI) if signed else builder.zext(v, _VI)

        return i32v(arr, idx), codegen

    return _load


load_u16 = _make_ext_load(types.uint16, 16, False)
load_u8 = _make_ext_load(types.uint8, 8, False)
load_i8 = _make_ext_load(types.int8, 8, True)


@intrinsic
def store_f32(typingctx, arr, idx, v):
    if not (_check_arr(arr, (types.float32,)) and v == f32v):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store(args[2], builder.bitcast(p, _VF.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


def _splat(vec, accepts, scalar, elt):
    """x (a number of one of the `accepts` kinds, cast to numba type `scalar`) in all 16 lanes."""
    @intrinsic
    def _sp(typingctx, x):
        if not isinstance(x, accepts):
            return None

        def codegen(context, builder, sig, args):
            s = context.cast(builder, args[0], sig.args[0], scalar)
            v = builder.insert_element(ir.Constant(elt, ir.Undefined), s, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, ir.Constant(elt, ir.Undefined), ir.Constant(_VI, None))

        return vec(x), codegen

    return _sp


splat_f32 = _splat(f32v, (types.Float, types.Integer), types.float32, _VF)
splat_i32 = _splat(i32v, (types.Integer,), types.int32, _VI)


@intrinsic
def zeros_f32(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, None)

    return f32v(), codegen


def _binop(name, kind):
    ty = f32v if kind == "f" else i32v

    @intrinsic
    def _op(typingctx, a, b):
        if a != ty or b != ty:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])

        return ty(a, b), codegen

    return _op


fadd = _binop("fadd", "f")
fsub = _binop("fsub", "f")
fmul = _binop("fmul", "f")
iand = _binop("and_", "i")
ior = _binop("or_", "i")
iadd = _binop("add", "i")
isub = _binop("sub", "i")


@intrinsic
def fma(typingctx, a, b, c):
    """a*b + c (fused where the target has FMA: llvm.fmuladd)."""
    if not (a == f32v and b == f32v and c == f32v):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF, _VF, _VF]),
                                            "llvm.fmuladd.v16f32")
        return builder.call(fn, list(args))

    return f32v(a, b, c), codegen


def _shift(name):
    @intrinsic
    def _sh(typingctx, a, n):
        if a != i32v or not isinstance(n, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            s = context.cast(builder, args[1], sig.args[1], types.int32)
            v = builder.insert_element(ir.Constant(_VI, ir.Undefined), s, ir.Constant(_I32, 0))
            v = builder.shuffle_vector(v, ir.Constant(_VI, ir.Undefined), ir.Constant(_VI, None))
            return getattr(builder, name)(args[0], v)

        return i32v(a, n), codegen

    return _sh


ishl = _shift("shl")
ilshr = _shift("lshr")
iashr = _shift("ashr")


def _convert(src, dst, name, doc):
    """A lane-wise conversion src -> dst vector by the llvmlite builder method `name`."""
    @intrinsic
    def _cv(typingctx, a):
        if a != src:
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], _VF if dst == f32v else _VI)

        return dst(a), codegen

    _cv.__doc__ = doc
    return _cv


i2f = _convert(i32v, f32v, "sitofp", "int32 lanes -> float32 (value conversion).")
bits2f = _convert(i32v, f32v, "bitcast", "Reinterpret int32 lanes as float32.")
f2i = _convert(f32v, i32v, "fptosi", "float32 lanes -> int32 (truncation toward zero, like a C cast).")


@intrinsic
def hsum(typingctx, a):
    """Horizontal sum (tree order) -> float32."""
    if a != f32v:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F, [_F, _VF]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(_F, -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(a), codegen


@intrinsic
def where_eq(typingctx, a, b, x, y):
    """Lane-wise (a == b) ? x : y for int32 a, b and float32 x, y."""
    if not (a == i32v and b == i32v and x == f32v and y == f32v):
        return None

    def codegen(context, builder, sig, args):
        c = builder.icmp_signed("==", args[0], args[1])
        return builder.select(c, args[2], args[3])

    return f32v(a, b, x, y), codegen


def _make_prefetch(locality, doc):
    @intrinsic
    def _pf(typingctx, arr, idx):
        if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            i = context.cast(builder, args[1], sig.args[1], types.intp)
            # plain integer arithmetic so that an out-of-range index is not UB in the GEP
            base = builder.ptrtoint(ary.data, ir.IntType(64))
            esz = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
            addr = builder.add(base, builder.mul(i, ir.Constant(ir.IntType(64), esz)))
            p = builder.inttoptr(addr, ir.IntType(8).as_pointer())
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
                "llvm.prefetch.p0")
            builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])
            return context.get_dummy_value()

        return types.void(arr, idx), codegen

    _pf.__doc__ = doc
    return _pf


prefetch = _make_prefetch(3, "Prefetch the cache line holding arr.flat[idx] into L1 (prefetcht0; never faults; "
                             "any index is safe).")
prefetch_l2 = _make_prefetch(2, "Like prefetch, but to L2 only (prefetcht1): for streams read once a little later, "
                                "where an L1 fill would evict lines still in use.")


@intrinsic
def load_bf16_rep4(typingctx, arr, idx):
    """lane l = float32(bf16 arr.flat[idx + l // 4]) for a uint16 array (4 values, each repeated 4 times)."""
    if not (_check_arr(arr, (types.uint16,)) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = _vload(builder, p, ir.IntType(16), 4)
        v = builder.zext(v, ir.VectorType(_I32, 4))
        mask = ir.Constant(_VI, [l // 4 for l in range(W)])
        v = builder.shuffle_vector(v, ir.Constant(ir.VectorType(_I32, 4), ir.Undefined), mask)
        v = builder.shl(v, ir.Constant(_VI, [16] * W))
        return builder.bitcast(v, _VF)

    return f32v(arr, idx), codegen


@intrinsic
def u32_as_f32(typingctx, x):
    """Scalar: reinterpret the low 32 bits of an integer as float32 (bf16 -> f32 is u16 << 16)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint32)
        return builder.bitcast(v, _F)

    return types.float32(x), codegen


def _fcmp_select(op):
    @intrinsic
    def _f(typingctx, a, b):
        if a != f32v or b != f32v:
            return None

        def codegen(context, builder, sig, args):
            c = builder.fcmp_ordered(op, args[0], args[1])
            return builder.select(c, args[0], args[1])

        return f32v(a, b), codegen

    return _f


fmax = _fcmp_select(">")   # lane-wise max (a > b ? a : b; NaN in a -> b)
fmin = _fcmp_select("<")


@intrinsic
def hsum16(typingctx, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """Lane i of the result = horizontal sum of v_i (16 reductions with 15 adds + 30 shuffles)."""
    vs = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)
    if any(v != f32v for v in vs):
        return None

    def codegen(context, builder, sig, args):
        # Each vector holds nsrc sources x width partial sums (source-major). Pairing (A, B) gives
        # 2 nsrc sources x width/2 partials: [A's sources | B's sources], low + high halves added.
        cur = list(args)
        width = W
        while len(cur) > 1:
            half = width // 2
            nsrc = W // width
            lo = [s * width + i for s in range(nsrc) for i in range(half)]
            lo = lo + [W + k for k in lo]
            hi = [k + half for k in lo]
            nxt = []
            for i in range(0, len(cur), 2):
                a = builder.shuffle_vector(cur[i], cur[i + 1], ir.Constant(_VI, lo))
                b = builder.shuffle_vector(cur[i], cur[i + 1], ir.Constant(_VI, hi))
                nxt.append(builder.fadd(a, b))
            cur = nxt
            width = half
        return cur[0]

    return f32v(*vs), codegen


@intrinsic
def load_e4m3(typingctx, arr, idx):
    """16 float8 e4m3fn codes (int8/uint8 array) -> float32 lanes holding value * 2^-8, exactly.

    The code's 7 magnitude bits are placed into an IEEE half (sign | 0eeee | mmm0000000): the half
    then equals value * 2^-8, fp8 subnormals becoming half subnormals, and the half -> float
    conversion (vcvtph2ps with F16C) is exact with no subnormal float arithmetic. NaN codes
    (0x7F / 0xFF) give NaN.
    """
    if not (_check_arr(arr, (types.int8, types.uint8)) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        i8, i16 = ir.IntType(8), ir.IntType(16)
        v8 = _vload(builder, p, i8)
        v16 = builder.sext(v8, ir.VectorType(i16, W))
        v16 = builder.shl(v16, ir.Constant(ir.VectorType(i16, W), [7] * W))
        v16 = builder.and_(v16, ir.Constant(ir.VectorType(i16, W), [0xBF80] * W))
        h = builder.bitcast(v16, ir.VectorType(ir.HalfType(), W))
        f = builder.fpext(h, _VF)
        isnan = builder.icmp_unsigned("==", builder.and_(v8, ir.Constant(ir.VectorType(i8, W), [0x7F] * W)),
                                      ir.Constant(ir.VectorType(i8, W), [0x7F] * W))
        return builder.select(isnan, ir.Constant(_VF, [float("nan")] * W), f)

    return f32v(arr, idx), codegen
