"""Cached pieces of the byte-LM test bed (tests/ptq_testbed.py) that several PTQ test files
compute: the float and round-to-nearest held-out losses, and one quantized model per rule.

Held-out losses are compile-bound: ``testbed.eval_loss`` jits a model's ``apply`` once per
``apply``, but ``quantize_model`` returns a new module at every call and two equal ones do
not compare equal, so evaluating ``quantize_model(tb.MODEL, rules).apply`` afresh traces
and compiles the whole model again (~1 CPU-s each). Here one quantized model per rule
serves every evaluation with that rule (round-to-nearest, GPTQ, AWQ, SmoothQuant trees
alike), and the float / RTN losses are computed once per process, whichever test file asks
first (pytest-xdist: once per worker).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ptq_testbed as tb

from jaxquant import QuantSpec
from jaxquant.app import testbed
from jaxquant.flax import Rule, convert

# Every Dense of the blocks and the head (the embedding stays in float).
LAYERS = testbed.LAYERS


def params(outliers: bool = False) -> dict:
    """The trained float params, or their outlier variant (the same function)."""
    return tb.outlier_params() if outliers else tb.params()


# The float model's logits, jitted once (an eager apply compiles op by op).
float_apply = jax.jit(tb.MODEL.apply)


@functools.cache
def float_loss(outliers: bool = False) -> float:
    """Held-out nats/byte of the float model."""
    return tb.eval_loss(tb.MODEL.apply, {"params": params(outliers)})


def served_model(weight: QuantSpec | None = None, act: QuantSpec | None = None) -> Any:
    """``quantize_model(tb.MODEL, [Rule(LAYERS, weight=weight, act=act)])``, one per specs
    (no specs: every layer in float, its online transforms applied), traced once
    (``jaxquant.app.testbed.quantized``)."""
    return testbed.quantized(tb.MODEL, (Rule(LAYERS, weight=weight, act=act),))


def loss(variables: Any, weight: QuantSpec | None = None, act: QuantSpec | None = None) -> float:
    """Held-out nats/byte of ``variables`` (float params, a converted tree, a method's
    result with its ``"ptq"`` transforms) served with the specs."""
    return tb.eval_loss(served_model(weight, act).apply, variables)


def converted_loss(variables: Any, weight: QuantSpec, act: QuantSpec | None = None) -> float:
    """Held-out nats/byte of ``variables`` converted (weights rounded to nearest, once)."""
    qm = served_model(weight, act)
    return tb.eval_loss(qm.apply, convert(qm, variables))


@functools.cache
def rtn_increase(weight: QuantSpec, act: QuantSpec | None = None, outliers: bool = False) -> float:
    """Held-out nats/byte over float of the converted model (round-to-nearest weights)."""
    return converted_loss({"params": params(outliers)}, weight, act) - float_loss(outliers)
