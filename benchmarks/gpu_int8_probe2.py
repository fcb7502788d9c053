"""Probe 2: jaxquant's quantized int8 dot (scales applied after the s8 GEMM) vs an exact
float32 emulation on this GPU, with and without the guards; and a batched fp8 dot whose
batch axis is not leading. Run on the device: python3 benchmarks/gpu_int8_probe2.py"""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxquant as jq
from jaxquant._src import dot as D

t0 = time.time()
rng = np.random.default_rng(0)
ls, rs = jq.QuantSpec("int8"), jq.QuantSpec("int8", jq.per_channel(-1))
shapes = list(itertools.product([8, 24, 64, 256], [16, 32, 64, 256], [10, 32, 128]))
for guard_min in ((0, 0, 0), (16, 64, 16)):  # without, then with the small-shape guard
    D._GPU_INT8_MIN = guard_min
    bad = []
    for m, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        dn = (((1,), (0,)), ((), ()))
        y = jax.jit(lambda x, w, dn=dn: jq.dot_general(x, w, dn, lhs_spec=ls, rhs_spec=rs))(x, w)
        ref = jnp.dot(jq.fake_quant(x, ls), jq.fake_quant(w, rs), precision="highest")
        err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
        if not err < 1e-5:
            bad.append((m, k, n, round(err, 3)))
    print(f"min={guard_min}: {len(bad)}/{len(shapes)} wrong {bad[:12]}")
print(f"{time.time() - t0:.0f} s")
# fp8, batch axis not leading (tests/test_dot.py test_general_dimension_numbers shape 4)
lhs = jnp.asarray(rng.standard_normal((8, 2, 16)), jnp.float32)
rhs = jnp.asarray(rng.standard_normal((2, 16, 4)), jnp.float32)
dn = (((2,), (1,)), ((1,), (0,)))
a_s, b_s = jq.QuantSpec("e4m3", jq.per_channel(1)), jq.QuantSpec("e4m3")
g_s = jq.QuantSpec("e5m2")
for low, nat in (("f32_out", False), ("f32_out", True), ("half_out", True)):
    D._FP8_LOWERING, D._NATIVE_FP8_CAST = low, nat
    f = lambda a, b: jq.dot_general(a, b, dn, lhs_spec=a_s, rhs_spec=b_s, grad_spec=g_s)
    y = jax.jit(f)(lhs, rhs)
    ga, gb = jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) ** 2), argnums=(0, 1)))(lhs, rhs)
    ref = lax.dot_general(jq.fake_quant(lhs, a_s), jq.fake_quant(rhs, b_s), dn, precision="highest")
    print(
        low,
        nat,
        "fwd err",
        float(jnp.max(jnp.abs(y - ref))),
        "finite grads",
        bool(jnp.all(jnp.isfinite(ga))),
        bool(jnp.all(jnp.isfinite(gb))),
    )
print(f"{time.time() - t0:.0f} s")
