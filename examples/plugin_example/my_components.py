"""A jbyz plugin: an aggregator, an attack and a model of one's own, registered by name.

Importing this module registers ``smallest_norms`` (aggregator), ``inverted_mean`` (attack) and
``tiny_mlp`` (model), so a configuration file can name them once the module is imported with
``jbyz run grid.toml --import my_components`` (with this folder on ``PYTHONPATH``), or with
``plugins = ["my_components.py"]`` in the file's ``[run]`` table, as ``grid.toml`` here does.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jbyz.aggregators import AGGREGATORS
from jbyz.attacks import ATTACKS
from jbyz.models import MODELS
from jbyz.types import AggregationRule, Attack


@AGGREGATORS.register(
    "smallest_norms",
    "Mean of the n - f valid inputs with the smallest norms (example plugin).",
    "examples/plugin_example",
)
def smallest_norms(slack: int = 0) -> AggregationRule:
    """Averages the ``n - f + slack`` valid rows of smallest L2 norm (``f`` declared, traced)."""

    def apply(x, valid, f, key, state):
        norms = jnp.where(valid, jnp.linalg.norm(x, axis=1), jnp.inf)
        rank = jnp.argsort(jnp.argsort(norms))  # 0 = smallest norm
        keep = valid & (rank < jnp.sum(valid) - f + slack)
        w = keep / jnp.maximum(jnp.sum(keep), 1)
        return jnp.sum(jnp.where(keep[:, None], x, 0.0) * w[:, None], axis=0), state

    def requirement(n, f):
        return None if n - f + slack >= 1 else f"smallest_norms needs n - f + slack >= 1; got n={n}, f={f}"

    return AggregationRule(name="smallest_norms", apply=apply, requirement=requirement)


@ATTACKS.register(
    "inverted_mean",
    "Byzantine workers send -scale times the honest mean (example plugin).",
    "examples/plugin_example",
)
def inverted_mean(scale: float = 4.0) -> Attack:
    def apply(x, honest, byz, key, state, ctx):
        mean = jnp.sum(jnp.where(honest[:, None], x, 0.0), axis=0) / jnp.maximum(jnp.sum(honest), 1)
        return jnp.where(byz[:, None], -scale * mean, x), state

    return Attack(name="inverted_mean", apply=apply)


class TinyMLP(nnx.Module):
    def __init__(self, input_shape, num_outputs, width, *, rngs):
        d = 1
        for s in input_shape:
            d *= int(s)
        self.hidden = nnx.Linear(d, width, rngs=rngs)
        self.out = nnx.Linear(width, num_outputs, rngs=rngs)

    def __call__(self, x, *, train=False, key=None):
        return self.out(jax.nn.tanh(self.hidden(x.reshape(x.shape[0], -1))))


@MODELS.register("tiny_mlp", "One tanh hidden layer of `width` units (example plugin).", "-")
def tiny_mlp(input_shape, num_outputs, *, rngs, width: int = 16):
    return TinyMLP(input_shape, num_outputs, width, rngs=rngs)
