"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one: run as a
script, without TRITON_INTERPRET, by `tests/test_triton_compile.py`.

The kernels' Python wrappers run as they do on a GPU (CPU tensors stand in for CUDA ones), but
each kernel launch is replaced by `triton.compile` of that launch's signature and constants to
a cubin (Triton's bundled ptxas): what a GPU's first call compiles, minus the launch. The
interpreter tests check what the kernels compute; this checks that the compiler accepts them,
the one thing the interpreter cannot. Prints one line per distinct kernel variant compiled:
name, registers and stack (spills) per thread, from cuobjdump."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

assert "TRITON_INTERPRET" not in os.environ, "the interpreter replaces the compiler"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from climber import ops  # noqa: E402
from climber.ops import triton_attention  # noqa: E402
from tests.test_attention import attention_inputs, cached_inputs, outputs_and_grads, with_candidates  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8", torch.int16: "i16",
         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
seen: set[str] = set()


def compile_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """JITFunction.run's stand-in: compile the launch for sm_90, do not run it."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = {**dict(zip((p.name for p in self.params), args)), **kwargs}
    signature, constants = {}, {}
    for p in self.params:
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constants[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            signature[p.name] = "fp32"
    key = f"{self.__name__} {sorted(signature.items())} {sorted(constants.items(), key=str)} {options}"
    if key in seen:
        return
    seen.add(key)
    kernel = triton.compile(ASTSource(self, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    res = " ".join(w for line in usage.splitlines() if "REG:" in line for w in line.split()[:2])
    print(f"compiled {self.__name__} {res} {dict(sorted(constants.items()))}", flush=True)


JITFunction.run = compile_launch
triton_attention.available = lambda device: True  # CPU tensors stand in for CUDA ones

for dtype in (torch.float32, torch.bfloat16):
    # training: f_b, the forward and the backward, history only and with candidates
    x = attention_inputs(2, 2, 2, 80, 64, 32, 32, 2, 1)
    x = {n: t.to(dtype) if t.is_floating_point() else t for n, t in x.items()}
    outputs_and_grads(ops.TRITON, x)
    outputs_and_grads(ops.TRITON, with_candidates(x, 60), n_hist=60)
    # serving: candidates only (score), new tokens and candidates (fold with a request), new tokens only
    for n, M, match in ((0, 70, True), (0, 70, False), (3, 70, True), (3, 0, False)):
        c = cached_inputs(2, 3, 2, M, 50, 64, dtype=dtype, n=n)
        if not M:
            c.update(hist_bias=None, self_bias=None)
        ops.TRITON.attend_cached(**c, match=match)
print(f"{len(seen)} kernel variants compiled for sm_90")
