"""Check the CPU linear kernel's AMX level (4) against the plain-JAX path, and time it
against the AVX-512 VNNI level (3), on a CPU with AMX (Sapphire Rapids and newer).

Usage (from the repository root, on the AMX host): python scripts/amx_check.py

Builds the kernel library from the repo's sources (as `make install` does), says which
level this CPU and OS allow, then for every weight format at shapes of 5 to 256 rows
(the AMX level runs above 4 rows; SmolLM2-135M's K=576/1536 and odd ones that leave
partial tiles): the level-4 result against the plain-JAX reference of the same weights
(float32 x, dequantized weights). AMX rounds x and the weights to bf16 and sums in
float32, so the bound checked is, per output, |y - ref| <= 2^-7 * sum_k |x_k| |w_k| + 1e-5:
each product's relative error is at most 2 * 2^-9 (two bf16 roundings), with a factor 2 of
room for the float32 sums. Then best-of-10 timings of level 4 vs level 3 (float and
integer activations) at SmolLM2's step shapes. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import os
import sys
import time

# The kernels are CPU FFI handlers: on a GPU host jax would pick the GPU and find none.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from backends.cpu.kernels import build  # noqa: E402
from backends.cpu.kernels import linear as kernels  # noqa: E402
from engine.model import quant  # noqa: E402

try:  # the GGUF formats need the gguf package's quantizers; without it they are skipped
    import gguf

    QTYPES = {f: getattr(gguf.GGMLQuantizationType, f.upper())
              for f in ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k")}
except ImportError:
    QTYPES = {}
AMX = kernels.AMX


def make_weight(rng: np.random.Generator, fmt: str, k: int, n: int) -> quant.QuantizedWeight:
    """A random [K] -> [N] weight in `fmt` (the GGUF ones through the gguf package)."""
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)  # [N, K]
    if fmt in ("q4_k", "q6_k"):  # the gguf package does not quantize these: random blocks
        size = quant.SUPER_BYTES[fmt]
        raw = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
        halves = (rng.standard_normal((n, k // 256, 2)) * 0.01).astype(np.float16)
        halves = halves.view(np.uint8).reshape(n, k // 256, 4)
        if fmt == "q4_k":
            raw[..., 0:4] = halves  # d, dmin
        else:
            raw[..., 208:210] = halves[..., :2]  # d
        return quant.from_gguf_rows(raw.reshape(n, -1), fmt, (k,), (n,))
    if fmt in QTYPES:
        return quant.from_gguf_rows(gguf.quants.quantize(w, QTYPES[fmt]), fmt, (k,), (n,))
    return quant.pack(jnp.asarray(w.T), 1, fmt)  # f32, bf16, int8


def check(rng: np.random.Generator, fmt: str, m: int, k: int, n: int) -> bool:
    w = make_weight(rng, fmt, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)  # [M, K]
    dense = np.asarray(quant.dequantize(w), np.float64)  # [K, N]
    ref = np.asarray(x, np.float64) @ dense
    bound = 2.0**-7 * (np.abs(np.asarray(x, np.float64)) @ np.abs(dense)) + 1e-5
    ok = True
    for int_act in (False, True) if quant.int_activations_ok(w) else (False,):
        got = np.asarray(kernels.kernel(x, w, AMX, int_act), np.float64)
        err = np.abs(got - ref)
        good = bool(np.all(err <= bound)) and bool(np.all(np.isfinite(got)))
        ok &= good
        print(f"  {fmt:5s} M={m:3d} K={k:4d} N={n:4d} int_act={int_act!s:5s} "
              f"max err {err.max():.2e} (bound {bound.min():.2e}-{bound.max():.2e}) "
              f"{'ok' if good else 'FAIL'}")
    return ok


def best_ms(f, *args, runs: int = 10) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> int:
    try:  # the package's own build path (as make install); a failure says why
        path = build.library_path()
        print(f"library: {path if path.exists() else build.build(path)}")
    except build.BuildError as e:
        print(f"the CPU kernels could not be built here: {e}")
        return 1
    if not QTYPES:
        print("gguf package missing: GGUF formats skipped (f32, bf16, int8 only)")
    native = kernels._native_isa()
    print(f"best level of this CPU: {native} (4 = AMX), load average {os.getloadavg()}")
    if native < AMX:
        print("no AMX level here (the CPU lacks AMX-TILE/AMX-BF16/AVX512-BF16, the kernel "
              "was built without AMX, or the OS refused the tile-data permission)")
        return 1
    rng = np.random.default_rng(0)
    ok = True
    shapes = ((5, 64, 7), (16, 576, 960), (17, 576, 33), (32, 1536, 576), (33, 96, 65),
              (256, 576, 1536))
    for fmt in ("f32", "bf16", "int8", *QTYPES):
        for m, k, n in shapes:
            if fmt in ("q4_k", "q6_k") and k % 256:
                k = 256 * max(1, k // 256)
            if fmt not in ("f32", "bf16", "int8") and k % 32:
                continue
            ok &= check(rng, fmt, m, k, n)
    print("timings, best of 10, ms: level 4 (AMX) / level 3 float x / level 3 integer x")
    for fmt in ("f32", "int8", *(f for f in ("q4_1", "q8_0") if f in QTYPES)):
        for m, k, n in ((32, 576, 1536), (32, 1536, 576), (256, 576, 1536), (32, 576, 49152)):
            w = make_weight(rng, fmt, k, n)
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
            cells = [best_ms(kernels.kernel, x, w, AMX), best_ms(kernels.kernel, x, w, 3)]
            if quant.int_activations_ok(w):
                cells.append(best_ms(kernels.kernel, x, w, 3, True))
            print(f"  {fmt:5s} M={m:3d} K={k:4d} N={n:5d}: "
                  + " / ".join(f"{c:8.3f}" for c in cells))
    print("ALL CHECKS PASSED" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
