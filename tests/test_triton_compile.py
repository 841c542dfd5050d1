"""Every Triton kernel compiles for a Hopper GPU (sm_90), checked on a machine without one.

CI has no GPU, and the interpreter (which the other attention tests use on CPU) runs a kernel's
Python without Triton's compiler, so a kernel the compiler rejects would pass every CPU test.
`tests/triton_sm90_compile.py` drives the kernels' wrappers on CPU tensors, training (f_b,
forward, backward) and serving (score, fold with and without candidates), in fp32 and bf16, and
compiles each launch to a cubin instead of running it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("_bias_fwd_kernel", "_fwd_kernel", "_bwd_delta_kernel", "_bwd_kernel", "_bias_grad_kernel",
           "_cached_kernel")


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                    reason="needs Triton's bundled ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_sm90_compile.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("compiled ")]
    assert set(compiled) == set(KERNELS), compiled
    assert len(compiled) == 2 * len(KERNELS) + 2  # fp32 and bf16; the cached kernel with and without the match
