r"""Partial participation for any robust method: clip each participant's deviation, aggregate, add back.

The heuristic of Malinovsky et al. (NeurIPS 2024, eq. 10) turns a robust aggregation rule
``Agg`` that needs an honest majority *in every round* into one that tolerates rounds where the
sampled clients are mostly Byzantine. With ``S_k`` the clients taking part in round ``k`` and
``g^{k-1}`` the previous aggregate:

.. math::
    g^k = g^{k-1} + \mathrm{Agg}\Big(\big\{\mathrm{clip}_{\lambda_k}(g_i^k - g^{k-1})
          : i \in S_k\big\}\Big), \qquad
    \mathrm{clip}_\lambda(y) = \min\!\Big(1, \frac{\lambda}{\|y\|}\Big) y ,

with :math:`\lambda_k = \lambda\,\|x^k - x^{k-1}\|` (paper) or, as in the authors' code
(``VR_Byzantine/code/simulator.py``), :math:`\lambda_k = c\,\|g^{k-1}\|` (``clip_mult`` ``c``; the
same thing as ``c = \lambda\gamma`` for a plain SGD server with step ``gamma``). Each clipped
deviation has norm at most ``lambda_k``, so however many of the inputs are Byzantine, the
aggregate moves by at most ``F_A lambda_k`` from ``g^{k-1}`` (``F_A = 1`` for rules that output a
convex combination of their inputs, ``sqrt(n)`` at worst for coordinate-wise rules).

Two forms are provided:

* :func:`clip_deviations`: a wrapper ``AggregationRule -> AggregationRule`` (same
  :class:`jbyz.types.AggregationRule` protocol, so it works with every rule of
  :data:`jbyz.aggregators.AGGREGATORS`, optionally behind pre-aggregators such as bucketing).
  Its state keeps ``g^{k-1}``; ``center=``, ``radius=`` and ``clip=`` keywords override it.
* :func:`pp_clipping`: the same as an optax ``GradientTransformationExtraArgs`` (an
  :class:`optax.experimental.aggregating.Aggregator`) mapping per-worker updates ``[n, ...]`` to
  one update, a drop-in for :func:`jbyz.transforms.robust_aggregate`.

The first call (no previous aggregate yet) aggregates without clipping, as the reference code's
first (full-participation) round.

Reference:
  Malinovsky, Richtárik, Horváth, Gorbunov. Byzantine robustness and partial participation can
  be achieved at once: just clip gradient differences. NeurIPS 2024 (arXiv:2311.14127), eq. (10).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from optax.experimental import aggregating

from jbyz import preaggregators as preagg
from jbyz.transforms import flat_vector, stack_to_matrix
from jbyz.types import AggregationRule, PreAggregator

Array = jax.Array

__all__ = [
    "PPClipState",
    "PPClippingState",
    "clip_deviations",
    "clip_rows",
    "client_momentum",
    "pp_clipping",
    "with_preaggregation",
]


def clip_rows(x: Array, radius, valid: Array | None = None) -> Array:
    r"""Clips every (valid) row of ``x [n, d]`` to L2 norm at most ``radius``.

    :math:`y_i = x_i \min(1, \text{radius} / \|x_i\|)`, ``clip(0) = 0``. Rows with a non-finite
    norm pass through unchanged (the downstream robust rule applies its own policy to them).
    """
    x = jnp.asarray(x, jnp.float32)
    valid = jnp.ones(x.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
    return preagg.clip_rows(x, preagg.row_norms(x, valid), jnp.asarray(radius, jnp.float32), valid)


def client_momentum(momenta, grads, clients, beta, *, all_clients: bool = False):
    r"""Each client's sum-form momentum ``m_i <- beta m_i + g_i`` under partial participation.

    ``momenta [n, d]`` holds every client's buffer (zeros before its first update, so the first
    update gives ``m_i = g_i``, as PyTorch's first ``momentum_buffer``). Two rules:

    * ``all_clients=False``: only the sampled ``clients [C]`` compute a gradient and update their
      buffer; ``grads [C, d]`` are theirs (row ``j`` for client ``clients[j]``).
    * ``all_clients=True``: the authors' code (github.com/SamuelHorvath/VR_Byzantine, branch
      ``partial_participation``: ``code/simulator.py`` lines 152-155 call
      ``compute_gradient`` on every worker each round, ``subset=None``, and
      ``MomentumWorker._save_grad`` in ``code/worker.py`` lines 141-150 updates the buffer there):
      every client's buffer moves each round, sampled or not; ``grads [n, d]`` are all clients'.

    Args:
      momenta: ``[n, d]`` buffers.
      grads: ``[C, d]`` (sampled clients) or ``[n, d]`` (``all_clients=True``).
      clients: ``[C]`` int, the sampled client ids.
      beta: the momentum coefficient.
      all_clients: see above.

    Returns:
      ``(new_momenta [n, d], messages [C, d])``: the messages are the sampled clients' updated
      buffers ``new_momenta[clients]``.

    Raises:
      ValueError: ``grads`` does not have one row per sampled client (``all_clients=False``)
        or per client (``all_clients=True``).
    """
    momenta = jnp.asarray(momenta)
    grads = jnp.asarray(grads)
    clients = jnp.asarray(clients, jnp.int32)
    n, c = momenta.shape[0], clients.shape[0]
    want = n if all_clients else c
    if grads.shape != (want,) + momenta.shape[1:]:
        who = f"all {n} clients" if all_clients else f"the {c} sampled clients"
        raise ValueError(
            f"client_momentum: all_clients={all_clients} needs grads of shape "
            f"{(want,) + tuple(momenta.shape[1:])} ({who}); got {tuple(grads.shape)}."
        )
    if all_clients:
        new = beta * momenta + grads
    else:
        new = momenta.at[clients].set(beta * momenta[clients] + grads)
    return new, new[clients]


def with_preaggregation(
    aggregator: AggregationRule, preaggregators: Sequence[PreAggregator] = ()
) -> AggregationRule:
    """Composes pre-aggregators (bucketing, NNM, ...) and an aggregator into one :class:`AggregationRule`.

    ``apply`` runs ``Pre_1 .. Pre_k`` then ``aggregator`` with keys split from the step key; the
    state is ``(pre_states, agg_state)``. ``requirement(n, f)`` checks every stage on the row count
    it sees. With no pre-aggregators the aggregator itself is returned.
    """
    preaggregators = tuple(preaggregators)
    if not preaggregators:
        return aggregator

    def rows_after(n):
        rows = [n]
        for pre in preaggregators:
            rows.append(pre.out_rows(rows[-1]))
        return rows

    def init(n, d):
        rows = rows_after(n)
        pre_states = tuple(pre.init(r, d) for pre, r in zip(preaggregators, rows))
        return (pre_states, aggregator.init(rows[-1], d))

    def apply(x, valid, f, key, state, **kw):
        x = jnp.asarray(x, jnp.float32)
        if isinstance(state, tuple) and state == ():
            state = init(x.shape[0], x.shape[1])
        pre_states, agg_state = state
        keys = jax.random.split(key, len(preaggregators) + 1)
        new_pre = []
        for i, (pre, ps) in enumerate(zip(preaggregators, pre_states)):
            x, valid, f, ps = pre.apply(x, valid, f, keys[i], ps)
            new_pre.append(ps)
        out, agg_state = aggregator.apply(x, valid, f, keys[-1], agg_state, **kw)
        return out, (tuple(new_pre), agg_state)

    def requirement(n, f):
        rows = rows_after(n)
        for pre, r in zip(preaggregators, rows):
            msg = pre.requirement(r, f)
            if msg:
                return msg
        return aggregator.requirement(rows[-1], f)

    name = "+".join([p.name for p in preaggregators] + [aggregator.name])
    return AggregationRule(
        name=name,
        apply=apply,
        init=init,
        requirement=requirement,
        needs_reference=aggregator.needs_reference,
    )


class PPClipState(NamedTuple):
    """State of :func:`clip_deviations`.

    Attributes:
      reference: ``[d]`` float32, the previous aggregate ``g^{k-1}``.
      started: bool ``[]``, whether a previous aggregate exists (the first call does not clip).
      inner: the wrapped aggregator's state.
    """

    reference: Array
    started: Array
    inner: Any


def clip_deviations(
    aggregator: AggregationRule,
    preaggregators: Sequence[PreAggregator] = (),
    *,
    clip_mult=1.0,
) -> AggregationRule:
    r"""Wraps any aggregator into the partial-participation clipping heuristic.

    .. math::
        \mathrm{out} = r + \mathrm{Agg}\big(\mathrm{Pre}(\{\mathrm{clip}_\lambda(x_i - r)\}_{i:\
        \mathrm{valid}_i})\big)

    where the centre ``r`` is the previous output (kept in the state) and the radius
    ``lambda = clip_mult * ||r||`` (the reference code's rule), unless ``center=`` /
    ``radius=`` are given to ``apply``. On the first call (``state.started`` False, unless an
    explicit ``center`` is given) or with ``clip=False`` the inputs are aggregated as they are:
    ``out = Agg(Pre(x))``. A ``reference=`` keyword is the server's reference vector of rules
    that need one (dSTAR, FLTrust: ``needs_reference``) and is passed on to the wrapped rule;
    for any other rule it is an error (the clipping centre is ``center=``).

    Args:
      aggregator: any :class:`~jbyz.types.AggregationRule` (e.g. ``AGGREGATORS.build("median")``).
      preaggregators: stages applied to the clipped deviations before ``aggregator`` (e.g.
        ``(bucketing(2),)``).
      clip_mult: ``c`` in ``lambda = c ||g^{k-1}||`` (float or traced array).

    Returns:
      An :class:`~jbyz.types.AggregationRule` whose ``apply(x, valid, f, key, state, *,
      center=None, radius=None, clip=None, reference=None)`` returns ``(out [d], PPClipState)``;
      ``init(n, d)`` gives the initial state (a ``()`` state is initialised on the fly).
      ``requirement`` is the wrapped rule's.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jbyz.aggregators import AGGREGATORS
      >>> agg = clip_deviations(AGGREGATORS.build("mean"))
      >>> x = jnp.array([[1.0, 0.0], [1.0, 0.0], [100.0, 0.0]])
      >>> out, st = agg(x, jnp.ones(3, bool), 1, jax.random.key(0),
      ...               state=agg.init(3, 2), center=jnp.array([1.0, 0.0]), radius=0.3)
      >>> out.tolist()  # the outlier's deviation (99, 0) is clipped to (0.3, 0)
      [1.100000023841858, 0.0]

    Reference:
      Malinovsky, Richtárik, Horváth, Gorbunov. NeurIPS 2024 (arXiv:2311.14127), eq. (10).
    """
    inner = with_preaggregation(aggregator, preaggregators)

    def init(n, d):
        return PPClipState(
            jnp.zeros((d,), jnp.float32), jnp.zeros((), bool), inner.init(n, d)
        )

    def apply(x, valid, f, key, state, *, center=None, radius=None, clip=None, **kw):
        if "reference" in kw and not inner.needs_reference:
            raise TypeError(
                f"clip_deviations({inner.name}): reference= is the server reference of rules that "
                f"need one, and {inner.name} does not; the clipping centre is center=")
        x = jnp.asarray(x, jnp.float32)
        n, d = x.shape
        if isinstance(state, tuple) and state == ():
            state = init(n, d)
        ref = state.reference if center is None else jnp.asarray(center, jnp.float32)
        if radius is None:
            radius = jnp.asarray(clip_mult, jnp.float32) * jnp.sqrt(jnp.sum(ref * ref))
        if clip is None:
            do_clip = jnp.asarray(True) if center is not None else state.started
        else:
            do_clip = jnp.asarray(clip, bool)
        dev = clip_rows(x - ref[None, :], radius, valid)
        y = jnp.where(do_clip, dev, x)
        agg, inner_state = inner.apply(y, valid, f, key, state.inner, **kw)
        out = jnp.where(do_clip, ref + agg, agg)
        return out, PPClipState(out, jnp.ones((), bool), inner_state)

    return AggregationRule(
        name=f"pp_clip({inner.name})",
        apply=apply,
        init=init,
        requirement=inner.requirement,
        needs_reference=inner.needs_reference,
    )


class PPClippingState(NamedTuple):
    """State of :func:`pp_clipping`: the wrapper's state, a key, the previous parameters."""

    clip_state: PPClipState
    key: Array
    prev_params: Any


_SALT = 0x5EED_CC


def pp_clipping(
    aggregator: AggregationRule,
    f,
    num_workers: int,
    *,
    clip_mult=1.0,
    radius: str = "aggregate",
    preaggregators: Sequence[PreAggregator] = (),
    seed: int = 0,
) -> aggregating.Aggregator:
    r"""The clipping heuristic as an optax transform ``[n, ...] -> [...]``.

    A drop-in for :func:`jbyz.transforms.robust_aggregate` that clips each participating
    worker's deviation from the previous aggregate before aggregating and adds the previous
    aggregate back (see the module docstring). Per-step ``extra_args``: ``valid`` (``[n]`` bool,
    the sampled clients), ``f``, ``key`` and ``clip`` (bool; ``False`` skips the clipping this
    step, e.g. in a full-participation round).

    Args:
      aggregator: any registry aggregator.
      f: declared number of Byzantine inputs (may be traced).
      num_workers: ``n``.
      clip_mult: the multiplier (float or traced).
      radius: ``"aggregate"``: ``lambda_k = clip_mult * ||g^{k-1}||`` (the reference code);
        ``"step"``: ``lambda_k = clip_mult * ||x^k - x^{k-1}||`` from the ``params`` passed to
        ``update`` (the paper's eq. 10; the same as ``"aggregate"`` with ``clip_mult / lr`` for a
        plain SGD server).
      preaggregators: e.g. ``(bucketing(2),)``, applied to the clipped deviations.
      seed: seeds bucketing when no ``key`` extra-arg is given.

    Returns:
      An :class:`optax.experimental.aggregating.Aggregator`.
    """
    if radius not in ("aggregate", "step"):
        raise ValueError(f"pp_clipping radius must be 'aggregate' or 'step', got {radius!r}")
    wrapped = clip_deviations(aggregator, preaggregators, clip_mult=clip_mult)

    def init_fn(params):
        d = sum(int(jnp.size(p)) for p in jax.tree.leaves(params))
        prev = jax.tree.map(jnp.asarray, params) if radius == "step" else ()
        return PPClippingState(wrapped.init(num_workers, d), jax.random.key(seed), prev)

    def update_fn(updates, state, params=None, *, valid=None, key=None, f=None, clip=None,
                  reference=None, **extra):
        del extra
        ref_kw = {}
        if wrapped.needs_reference:  # the server's reference, for rules that need one
            if reference is None:
                raise ValueError(f"pp_clipping({wrapped.name}) needs the server's reference: "
                                 "pass reference=... as an extra argument")
            ref_kw["reference"] = flat_vector(reference)
        x, unravel = stack_to_matrix(updates)
        v = jnp.ones((num_workers,), bool) if valid is None else jnp.asarray(valid, bool)
        f_ = jnp.asarray(f_default if f is None else f, jnp.int32)
        if key is None:
            state_key, step_key = jax.random.split(state.key)
        else:
            state_key, step_key = state.key, jax.random.fold_in(key, _SALT)
        rad, prev = None, state.prev_params
        if radius == "step":
            if params is None:
                raise ValueError("pp_clipping(radius='step') needs params passed to update")
            diff = jax.tree.map(lambda a, b: jnp.asarray(a, jnp.float32) - b, params, prev)
            rad = jnp.asarray(clip_mult, jnp.float32) * optax.tree.norm(diff)
            prev = jax.tree.map(jnp.asarray, params)
        out, cs = wrapped.apply(x, v, f_, step_key, state.clip_state, radius=rad, clip=clip,
                                **ref_kw)
        return unravel(out), PPClippingState(cs, state_key, prev)

    f_default = f
    return aggregating.Aggregator(init_fn, update_fn)
