"""Compile the kernels for a CUDA target without a GPU (Triton's ahead-of-time path), so that a
machine without one still checks what only the compiler sees: constexpr rules the interpreter
does not enforce, and the PTX's arithmetic (IEEE division and square root, no fused multiply-add,
which would change the bytes).

    python -m horovod_tnq.gpu.aot [capability]   # prints one line per kernel; exit 1 on a
                                                      # compile error or forbidden instruction

Run it with TRITON_INTERPRET unset (the interpreter's kernels cannot be compiled).
"""

import re
import sys

# Instructions whose presence breaks bit-exactness: fused multiply-adds of floats, and the
# approximate float32 division and square root.
FORBIDDEN = re.compile(r"\b(fma\.rn\.f(32|64)|fma\.rn\.ftz\.f32|mad\.f(32|64)|div\.(full|approx)"
                       r"\.f32|sqrt\.approx\.f32|rcp\.approx)")


def _variants():
    """(name, kernel, signature, constexprs, num_warps) of each kernel as codec.py launches it,
    one typical configuration per kernel and work dtype."""
    from . import kernels as k
    out = []
    for f64 in (False, True):
        w = "fp64" if f64 else "fp32"
        out.append((f"rht_encode_{w}", k.rht_encode_kernel, dict(
            x_ptr="*bf16" if not f64 else "*fp64", n="i32", num_buckets="i32", num_tiles="i32",
            scratch_ptr="*" + w, table_ptr="*fp32", scales_ptr="*" + w, codes_ptr="*u8",
            norms_ptr="*fp64", counts_ptr="*i32", key_lo="u32", step_word="u32", root="fp64"),
            dict(B=512, LOG2B=9, ROWS=8, BITS=4, WORK_F64=f64), 8))
        out.append((f"rht_decode_{w}", k.rht_decode_kernel, dict(
            buf_ptr="*u8", payload_size="i32", codes_offset="i32", codes_size="i32",
            scales_ptr="*" + w, keys_ptr="*i64", table_ptr="*" + w, out_ptr="*fp32",
            factor="fp64", n="i32", num_buckets="i32", num_payloads="i32"),
            dict(B=512, LOG2B=9, ROWS=4, BITS=3, WORK_F64=f64, OUT_F64=False), 8))
        for fused in (True, False):
            out.append((f"tnq_encode_{w}_{'fused' if fused else 'statistic'}",
                        k.tnq_encode_kernel, dict(
                            x_ptr="*fp16", n="i32", bucket_size="i32", num_buckets="i32",
                            table_ptr="*fp32", scales_ptr="*" + w, divisors_ptr="*" + w,
                            codes_ptr="*u8", codes_size="i32", counts_ptr="*i32", key_lo="u32",
                            step_word="u32"),
                        dict(ROWS=64, BITS=2, WORK_F64=f64, FUSED=fused), 4))
        out.append((f"tnq_quantize_{w}", k.tnq_quantize_kernel, dict(
            x_ptr="*fp32", n="i32", bucket_size="i32", divisors_ptr="*" + w, table_ptr="*fp32",
            codes_ptr="*u8", codes_size="i32", key_lo="u32", step_word="u32"),
            dict(BLOCK=2048, BITS=5, WORK_F64=f64), 8))
    out.append(("tnq_decode", k.tnq_decode_kernel, dict(
        buf_ptr="*u8", payload_size="i32", codes_offset="i32", codes_size="i32",
        scales_ptr="*fp64", table_ptr="*fp64", out_ptr="*fp64", factor="fp64", n="i32",
        bucket_size="i32", num_buckets="i32", num_payloads="i32"),
        dict(BLOCK=2048, BITS=8, OUT_F64=True), 8))
    return out


def compile_all(capability=90, names=None):
    """{kernel variant: PTX} for sm_<capability>, compiled as codec.py launches them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", capability, 32)
    ptx = {}
    for name, kernel, signature, constexprs, warps in _variants():
        if names is not None and name not in names:
            continue
        signature = dict(signature, **{key: "constexpr" for key in constexprs})
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=dict(
            num_warps=warps, enable_fp_fusion=False, enable_reflect_ftz=False))
        ptx[name] = compiled.asm["ptx"]
    return ptx


def main(argv):
    capability = int(argv[1]) if len(argv) > 1 else 90
    bad = 0
    for name, text in compile_all(capability).items():
        forbidden = sorted(set(m.group(0) for m in FORBIDDEN.finditer(text)))
        ops = sorted(set(re.findall(r"\b(?:div\.rn\.f(?:32|64)|sqrt\.rn\.f64)", text)))
        print(f"{name}: {'FORBIDDEN ' + ' '.join(forbidden) if forbidden else 'ok'}"
              f" ({' '.join(ops) or 'no division'})")
        bad += bool(forbidden)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
