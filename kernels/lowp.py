"""tl.dot on low-precision operands, shared by the kernels that feed bf16/fp16 tiles to the tensor cores.

Triton's interpreter (3.9) multiplies bfloat16 tl.dot operands wrongly and converts fp32 to bfloat16 by
truncation. There ``mma`` takes every product on the operands converted to fp32 (exact for bf16/fp16 values,
with fp32 accumulation as on a GPU) and ``cast`` rounds to nearest even before converting to bfloat16, as a
GPU does. Compiled, both are plain ``tl.dot`` and ``.to``.
"""

import triton
import triton.language as tl

from ..backend import interpreter_enabled

INTERPRETER = tl.constexpr(interpreter_enabled())


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b (fp32 accumulation; acc may be None)."""
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(v, dtype: tl.constexpr):
    """v converted to dtype, rounding to nearest even."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)
