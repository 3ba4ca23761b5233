r"""Byz-VR-MARINA-PP: Byzantine robustness and partial participation via clipped gradient differences.

Problem: :math:`\min_x f(x) = \frac1G\sum_{i\in\mathcal G} f_i(x)`, :math:`f_i = \frac1m\sum_j
f_{i,j}`, with ``n`` clients of which the first ``f_real`` are Byzantine (``jbyz`` convention).

Algorithm 1 of Malinovsky et al. (NeurIPS 2024), with a (bucketed) robust aggregator ``ARAgg``,
an unbiased compressor ``Q`` (independent per client and round), stepsize ``gamma``,
probability ``p``, client sample sizes ``C <= C_hat`` and clipping multiplier ``alpha``.
For ``k = 0, 1, ..., K - 1``:

1. ``c_k ~ Bernoulli(p)``; ``S_k`` = ``C_hat`` clients if ``c_k = 1`` else ``C`` clients, drawn
   uniformly without replacement (the number of Byzantine clients in ``S_k`` varies per round and
   may exceed half of it).
2. :math:`x^{k+1} = x^k - \gamma g^k`, :math:`\lambda_{k+1} = \alpha\|x^{k+1} - x^k\|`.
3. Honest ``i in S_k`` sends ``grad f_i(x^{k+1})`` if ``c_k = 1``, else
   :math:`Q_i(\hat\Delta_i)` with the *same-sample* difference
   :math:`\hat\Delta_i = \frac1b\sum_{j\in J_i}[\nabla f_{i,j}(x^{k+1}) - \nabla f_{i,j}(x^k)]`.
4. Server: :math:`g^{k+1} = \mathrm{ARAgg}(\{\nabla f_i(x^{k+1})\}_{S_k})` if ``c_k = 1``, else
   :math:`g^{k+1} = g^k + \mathrm{ARAgg}(\{\mathrm{clip}_{\lambda_{k+1}}(m_i)\}_{i\in S_k})`.

``g^0 = ARAgg`` of the full local gradients of all ``n`` clients at ``x^0`` (our assumption: the
paper leaves ``g^0`` open; the reference code starts with such a full round).

Variants (:class:`MarinaConfig`):

* ``variant="pp"`` (default): the algorithm above.
* ``variant="pp_plus"``: Byz-VR-MARINA-PP+ (Alg. 3): the plain mean of the clipped messages in
  compressed rounds (``ARAgg`` kept in full rounds).
* ``variant="marina"``: Byz-VR-MARINA (Gorbunov et al. 2023): every client in every round, no
  clipping.
* ``full_gradients=False``: the variant without full gradients (Alg. 4/5): in ``c_k = 1`` rounds
  the clients send a ``b'``-minibatch gradient (``oracle.big_batch_grad``).
* The authors' scripts (github.com/SamuelHorvath/VR_Byzantine, branch ``partial_participation``),
  off by default:

  - ``full_round_every=E``: the a9a script's schedule. ``code/run_a9a.py`` sets
    ``RandomNumber.full_grad_prob = 0.`` (line 318) and ``RandomNumber.full_grad = True`` at the
    start of every epoch (line 334), so the first round of each epoch is a full-gradient,
    full-participation round and no other is; an epoch is
    ``min(ceil(m / b), max_batches)`` rounds (``max_batches`` defaults to 1000 in
    ``code/opts.py``; 1000 rounds for a9a with ``-b 32``, so about ``p = b/m``). Round ``k`` here
    (``x^{k+1}``) is the script's round ``k + 1`` (its round 0 is our ``g^0``), so ``c_k = 1``
    iff ``(k + 1) % E == 0``; ``p`` is then not used.
  - ``force_p_zero=True``: the MNIST script's schedule (``code/run_mnist.py`` lines 360-363:
    ``full_grad`` is True only in the first round of epoch 1 and the probability is 0), i.e. no
    full round after ``g^0``. That script trains momentum SGD, not MARINA; the a9a script does
    not do this.
  - ``threshold="aggregate"``: ``lambda_{k+1} = alpha ||g^k||`` (``code/simulator.py`` line 99,
    ``clip_mult * ||last_gradient||``, shared by both scripts), relative to the previous
    aggregate instead of ``alpha ||x^{k+1} - x^k|| = alpha gamma ||g^k||``.

The run is a pure function (``lax.scan`` over rounds) of ``(x0, params, key)``:
:class:`MarinaParams` holds everything numeric (``lr``, ``p``, ``alpha``, ``f_real``, ``f``), so a
grid ``jax.vmap``s over seeds and hyper-parameters. Rounds use ``lax.cond`` on ``c_k`` (under
``vmap`` both branches run, so each round then costs a full-gradient round).

Keys: round ``k`` uses ``kk = fold_in(key, k)``; the coin, the client sample, the minibatches,
the compression masks, the attack and the aggregator draw from ``fold_in(kk, salt)`` (see
:func:`round_keys`); client ``i``'s minibatch key is ``fold_in(grad_key, i)`` and the same key
is used at ``x^{k+1}`` and ``x^k`` (same sample); slot ``s``'s compression mask is
``fold_in(comp_key, s)``.

Reference:
  Malinovsky, Richtárik, Horváth, Gorbunov. Byzantine robustness and partial participation can
  be achieved at once: just clip gradient differences. NeurIPS 2024 (arXiv:2311.14127);
  Gorbunov, Horváth, Richtárik, Gidel. Variance reduction is an antidote to Byzantines: better
  rates, weaker assumptions and communication compression as a cherry on the top. ICLR 2023.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbyz.algorithms.pp_clipping import clip_rows, with_preaggregation
from jbyz.attacks import honest_mean_std
from jbyz.compression import Compressor, identity
from jbyz.data import flip_labels
from jbyz.registry import ConfigError
from jbyz.types import AggregationRule, Attack, PreAggregator

Array = jax.Array

__all__ = [
    "MarinaConfig",
    "MarinaParams",
    "MarinaState",
    "Oracle",
    "RoundKeys",
    "build_run",
    "default_aggregator",
    "finite_sum_oracle",
    "init",
    "round_keys",
    "sample_clients",
    "shift_back",
    "step",
]


# --------------------------------------------------------------------------------------------
# Shift-back attack


def shift_back(mult: Any = 2.0, otherwise: str = "mean") -> Attack:
    r"""Shift-back (SHB): a Byzantine majority of the sampled clients pulls the model back to ``x^0``.

    If the Byzantine rows are a strict majority of the participating rows
    (``|byz| > |honest|``), every Byzantine row sends

    .. math:: v = \frac{\text{mult}}{\gamma}\,(x - x^0) - r ,

    so that a server whose aggregate is ``r + v`` and which steps ``x - gamma (r + v)`` lands on
    ``x - mult (x - x^0)``. ``r`` is the vector the server adds back (the previous aggregate
    ``g^k`` in MARINA's compressed rounds; 0 when the messages are gradients). This is the rule
    of the authors' ``code/attacks/shiftback.py`` (lines 42-48 on the ``partial_participation``
    branch of SamuelHorvath/VR_Byzantine: the attacker's gradient is
    ``mult / lr * (current model - initial model)``), written for a server that adds ``r`` back.
    The multiplier differs between the authors' scripts:

    * ``mult="lr"``: **the a9a script's form** (``code/run_a9a.py`` line 216,
      ``multiplier='lr'``, so ``mult / lr = 1``): the Byzantine aggregate is ``x - x^0`` and the
      server moves by ``gamma (x^0 - x)``, a fraction ``gamma`` of the way back to ``x^0``. This
      is the form of the logistic-regression experiments (the paper's a9a runs).
    * ``mult=2.0`` (default, kept so that existing results do not change): **the MNIST script's
      form** (``code/run_mnist.py`` line 209, ``multiplier=2.``): the model is reflected through
      ``x^0`` (``x -> 2 x^0 - x``).
    * ``mult=1.0`` returns to ``x^0`` exactly (no script uses it).

    Otherwise the Byzantine clients act honestly: they send the mean of the honest rows
    (``otherwise="mean"``, the reference code) or their own honest row (``"own"``).

    ``ctx`` must hold ``params`` (flat ``[d]``, the point ``x`` the server will step from), ``x0``
    (flat ``[d]``), ``lr`` (``gamma``) and optionally ``reference`` (``r``, default 0).

    Args:
      mult: the multiplier: a float (or traced scalar), or the string ``"lr"`` (the a9a
        script's ``multiplier='lr'``: ``mult = gamma``, i.e. ``v = (x - x^0) - r``).
      otherwise: ``"mean"`` or ``"own"``.

    Returns:
      An :class:`~jbyz.types.Attack`.

    Raises:
      ConfigError: ``mult`` is a string other than ``"lr"``, or ``otherwise`` is unknown.

    Reference:
      Malinovsky et al., NeurIPS 2024, §5 and appendix H (shift-back attack); the authors' code,
      github.com/SamuelHorvath/VR_Byzantine (branch ``partial_participation``).
    """
    if otherwise not in ("mean", "own"):
        raise ConfigError(f"shift_back: otherwise must be 'mean' or 'own'; got {otherwise!r}.")
    if isinstance(mult, str) and mult != "lr":
        raise ConfigError(
            "shift_back: mult must be a number or 'lr' (the a9a script's multiplier); "
            f"got {mult!r}."
        )
    lr_form = isinstance(mult, str)

    def apply(x, honest, byz, key, state, ctx):
        del key
        for name in ("params", "x0", "lr"):
            if name not in ctx:
                raise ConfigError(f"shift_back needs ctx[{name!r}] (flat parameters, x0, lr).")
        xk = jnp.asarray(ctx["params"], jnp.float32)
        x0 = jnp.asarray(ctx["x0"], jnp.float32)
        ref = jnp.asarray(ctx.get("reference", 0.0), jnp.float32)
        lr = jnp.asarray(ctx["lr"], jnp.float32)
        majority = jnp.sum(byz.astype(jnp.int32)) > jnp.sum(honest.astype(jnp.int32))
        scale = jnp.float32(1.0) if lr_form else jnp.asarray(mult, jnp.float32) / lr
        target = scale * (xk - x0) - ref
        if otherwise == "mean":
            fallback, _ = honest_mean_std(x, honest, with_std=False)
            fallback = jnp.broadcast_to(fallback, x.shape)
        else:
            fallback = x.astype(jnp.float32)
        mal = jnp.where(majority, jnp.broadcast_to(target, x.shape), fallback)
        return jnp.where(byz[:, None], mal.astype(x.dtype), x), state

    return Attack(name="shift_back", apply=apply)


# --------------------------------------------------------------------------------------------
# Gradient oracles


@dataclasses.dataclass(frozen=True)
class Oracle:
    """Per-client gradient oracles on flat parameter vectors.

    Attributes:
      minibatch_grad: ``(x [d], client int32[], key, flip bool[]) -> [d]``: the mean gradient of
        client ``client`` on a minibatch of ``batch_size`` of its samples drawn from ``key`` (the
        same key gives the same minibatch: MARINA calls it at ``x^{k+1}`` and ``x^k``). ``flip``:
        compute it on flipped labels (label-flipping Byzantine clients).
      full_grad: ``(x, client, flip) -> [d]``: the full local gradient ``grad f_i(x)``; needed
        when ``MarinaConfig.full_gradients`` (the default).
      batch_size: ``b``.
      local_size: ``m``, samples per client (for the epoch count).
      big_batch_grad: like ``minibatch_grad`` with ``big_batch_size`` samples (the variant
        without full gradients).
      big_batch_size: ``b'``.
    """

    minibatch_grad: Callable[..., Array]
    full_grad: Callable[..., Array] | None
    batch_size: int
    local_size: int
    big_batch_grad: Callable[..., Array] | None = None
    big_batch_size: int | None = None


def finite_sum_oracle(
    loss: Callable[[Array, Array, Array], Array],
    features,
    labels,
    client_indices,
    batch_size: int,
    *,
    big_batch_size: int | None = None,
    num_classes: int | None = None,
) -> Oracle:
    """An :class:`Oracle` for finite sums ``f_i(x) = (1/m) sum_j loss(x, a_ij, y_ij)``.

    Args:
      loss: ``(x [d], xb [B, ...], yb [B]) -> scalar`` mean loss of a batch.
      features: ``[N, ...]`` all samples (kept on the device).
      labels: ``[N]`` integer labels.
      client_indices: ``[n, m]`` int, client ``i``'s sample indices (equal ``m`` for every
        client; e.g. ``jbyz.data.split_workers(y, n, "shared").indices`` when every client holds
        the full data).
      batch_size: ``b``; minibatches are ``b`` uniform draws with replacement from the client's
        ``m`` samples.
      big_batch_size: ``b'`` for the variant without full gradients.
      num_classes: for label flipping ``y -> C - 1 - y`` (default ``max(labels) + 1``).

    Returns:
      An :class:`Oracle`.
    """
    features = jnp.asarray(features)
    labels = jnp.asarray(labels)
    idx_table = jnp.asarray(client_indices, jnp.int32)
    m = int(idx_table.shape[1])
    classes = int(jnp.max(labels)) + 1 if num_classes is None else int(num_classes)

    def batch_grad(x, idx, flip):
        yb = labels[idx]
        yb = jnp.where(flip, flip_labels(yb, classes), yb)
        return jax.grad(loss)(x, features[idx], yb)

    def draw(client, key, size):
        pos = jax.random.randint(key, (size,), 0, m)
        return idx_table[client][pos]

    def minibatch_grad(x, client, key, flip):
        return batch_grad(x, draw(client, key, batch_size), flip)

    idx_np = np.asarray(client_indices)
    shared = bool(np.all(idx_np == idx_np[:1]))
    if shared:
        # Every client holds the same samples: no per-client gather of the local data (under
        # vmap over runs the full-gradient branch runs every round, and the gather dominates).
        shared_x = features[jnp.asarray(idx_np[0])]
        shared_y = labels[jnp.asarray(idx_np[0])]

        def full_grad(x, client, flip):
            del client
            yb = jnp.where(flip, flip_labels(shared_y, classes), shared_y)
            return jax.grad(loss)(x, shared_x, yb)

    else:

        def full_grad(x, client, flip):
            return batch_grad(x, idx_table[client], flip)

    def big_batch_grad(x, client, key, flip):
        return batch_grad(x, draw(client, key, big_batch_size), flip)

    big = big_batch_grad if big_batch_size is not None else None
    return Oracle(minibatch_grad, full_grad, int(batch_size), m, big, big_batch_size)


# --------------------------------------------------------------------------------------------
# Configuration, parameters, state


@dataclasses.dataclass(frozen=True)
class MarinaConfig:
    """Static configuration of a Byz-VR-MARINA-PP run (one compiled program per configuration).

    Attributes:
      num_clients: ``n``.
      num_steps: ``K`` rounds.
      aggregator: the robust rule (e.g. ``AGGREGATORS.build("median")``).
      preaggregators: e.g. ``(bucketing(2),)``: ``ARAgg = aggregator o preaggregators``.
      attack: a :class:`~jbyz.types.Attack` (``shift_back()``, registry attacks; ``ctx`` holds
        ``params`` = ``x^{k+1}``, ``x0``, ``lr``, ``reference``, ``f``, ``step``).
      compressor: unbiased ``Q`` (default identity; e.g. ``compression.randk(k=...)``).
      clients_per_round: ``C`` (default ``n``).
      clients_full_round: ``C_hat`` (default ``n``).
      variant: ``"pp"`` | ``"pp_plus"`` | ``"marina"`` (full participation, no clipping).
      clip: clip the messages of compressed rounds (``variant="marina"`` never clips).
      full_gradients: ``False`` selects the variant without full gradients (Alg. 4/5).
      threshold: ``"step"`` (``alpha ||x^{k+1} - x^k||``, paper) or ``"aggregate"``
        (``alpha ||g^k||``, the authors' ``code/simulator.py``).
      force_p_zero: the MNIST script's schedule: no full rounds after ``g^0`` whatever ``p``.
      full_round_every: ``None`` (default): ``c_k ~ Bernoulli(p)`` (Alg. 1). An int ``E >= 1``:
        the a9a script's schedule, a full round at the start of every epoch of ``E`` rounds
        (``c_k = 1`` iff ``(k + 1) % E == 0``, ``p`` unused); for a finite sum with ``m`` samples
        per client and batch ``b`` the script's epoch is ``min(ceil(m / b), 1000)`` rounds.
    """

    num_clients: int
    num_steps: int
    aggregator: AggregationRule
    preaggregators: tuple = ()
    attack: Attack | None = None
    compressor: Compressor = dataclasses.field(default_factory=identity)
    clients_per_round: int | None = None
    clients_full_round: int | None = None
    variant: str = "pp"
    clip: bool = True
    full_gradients: bool = True
    threshold: str = "step"
    force_p_zero: bool = False
    full_round_every: int | None = None

    def __post_init__(self):
        if self.variant not in ("pp", "pp_plus", "marina"):
            raise ConfigError(
                f"marina: variant must be 'pp', 'pp_plus' or 'marina'; got {self.variant!r}."
            )
        if self.threshold not in ("step", "aggregate"):
            raise ConfigError(
                f"marina: threshold must be 'step' or 'aggregate'; got {self.threshold!r}."
            )
        e = self.full_round_every
        if e is not None:
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1:
                raise ConfigError(
                    f"marina: full_round_every must be None or an int >= 1 (rounds per epoch); "
                    f"got {e!r}."
                )
            if self.force_p_zero:
                raise ConfigError(
                    "marina: full_round_every (the a9a script's epoch-start full rounds) and "
                    "force_p_zero (the MNIST script's single full round) exclude each other."
                )
        n = self.num_clients
        c, ch = self.sizes
        if not 1 <= c <= ch <= n:
            raise ConfigError(f"marina: need 1 <= C <= C_hat <= n; got C={c}, C_hat={ch}, n={n}.")
        object.__setattr__(self, "preaggregators", tuple(self.preaggregators))

    @property
    def sizes(self) -> tuple[int, int]:
        """``(C, C_hat)`` after defaults and the variant (``marina``: ``(n, n)``)."""
        n = self.num_clients
        if self.variant == "marina":
            return n, n
        ch = n if self.clients_full_round is None else int(self.clients_full_round)
        c = n if self.clients_per_round is None else int(self.clients_per_round)
        return c, ch

    @property
    def clips(self) -> bool:
        return self.clip and self.variant != "marina"


class MarinaParams(NamedTuple):
    """Numeric hyper-parameters (arrays; a grid vmaps over them).

    Attributes:
      lr: stepsize ``gamma``.
      p: probability of a full round.
      alpha: clipping multiplier (``lambda_{k+1} = alpha ||x^{k+1} - x^k||``).
      f_real: number of Byzantine clients (the first ``f_real`` client ids), int32.
      f: the ``f`` declared to the aggregator, int32.
    """

    lr: Any
    p: Any
    alpha: Any = 1.0
    f_real: Any = 0
    f: Any = 0


class MarinaState(NamedTuple):
    x: Array  # [d] current point x^k
    g: Array  # [d] current estimator g^k
    x0: Array  # [d]
    step: Array  # int32 []
    epochs: Array  # float32 [], cumulative per-sample gradient evaluations / (n m)
    full_agg_state: Any
    comp_agg_state: Any
    attack_state: Any


INIT_ROUND = 2**32 - 1  # the key index of the g^0 round (rounds are 0 .. K-1)


class RoundKeys(NamedTuple):
    coin: Array
    sample: Array
    grad: Array
    compress: Array
    attack: Array
    aggregate: Array


def round_keys(key, k) -> RoundKeys:
    """The keys of round ``k`` of a run with key ``key`` (``fold_in(fold_in(key, k), salt)``)."""
    kk = jax.random.fold_in(key, k)
    return RoundKeys(*(jax.random.fold_in(kk, s) for s in range(6)))


def sample_clients(key, n: int, size: int) -> Array:
    """``size`` distinct client ids out of ``n``, uniformly (a random permutation's head)."""
    return jnp.argsort(jax.random.uniform(key, (n,)))[:size].astype(jnp.int32)


def _params(params: MarinaParams) -> MarinaParams:
    return MarinaParams(
        jnp.asarray(params.lr, jnp.float32),
        jnp.asarray(params.p, jnp.float32),
        jnp.asarray(params.alpha, jnp.float32),
        jnp.asarray(params.f_real, jnp.int32),
        jnp.asarray(params.f, jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# One round


def _ctx(params, x_point, x0, reference, k):
    return {"params": x_point, "x0": x0, "lr": params.lr, "reference": reference,
            "f": params.f, "step": k}


def _attack(config, msgs, clients, params, key, attack_state, ctx):
    if config.attack is None:
        return msgs, attack_state
    byz = clients < params.f_real
    out, attack_state = config.attack.apply(msgs, ~byz, byz, key, attack_state, ctx)
    return out.astype(msgs.dtype), attack_state


def _flip(config, clients, params):
    flips = config.attack is not None and config.attack.flips_labels
    return (clients < params.f_real) & flips


def _full_messages(config, oracle, x, clients, params, key):
    flip = _flip(config, clients, params)
    if config.full_gradients:
        if oracle.full_grad is None:
            raise ConfigError("marina: full_gradients=True needs oracle.full_grad.")
        return jax.vmap(oracle.full_grad, in_axes=(None, 0, 0))(x, clients, flip)
    if oracle.big_batch_grad is None:
        raise ConfigError("marina: full_gradients=False needs oracle.big_batch_grad (b').")
    keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(clients)
    return jax.vmap(oracle.big_batch_grad, in_axes=(None, 0, 0, 0))(x, clients, keys, flip)


def _full_cost(config, oracle):
    return oracle.local_size if config.full_gradients else oracle.big_batch_size


def _aggregator(config):
    return with_preaggregation(config.aggregator, config.preaggregators)


def init(config: MarinaConfig, oracle: Oracle, x0, params: MarinaParams, key) -> MarinaState:
    """``g^0 = ARAgg({grad f_i(x^0)}_{i in [n]})`` (Byzantine rows attacked) and the state at ``k = 0``.

    Uses the keys of :func:`round_keys` ``(key, INIT_ROUND)`` (``INIT_ROUND = 2**32 - 1``).
    """
    params = _params(params)
    x0 = jnp.asarray(x0)
    n, d = config.num_clients, x0.shape[0]
    c, ch = config.sizes
    agg = _aggregator(config)
    rk = round_keys(key, INIT_ROUND)
    clients = jnp.arange(n, dtype=jnp.int32)
    attack_state = config.attack.init(n, d) if config.attack is not None else ()
    msgs = _full_messages(config, oracle, x0, clients, params, rk.grad)
    ctx = _ctx(params, x0, x0, jnp.zeros_like(x0), -1)
    msgs, attack_state = _attack(config, msgs, clients, params, rk.attack, attack_state, ctx)
    g0, _ = agg.apply(msgs, jnp.ones((n,), bool), params.f, rk.aggregate, agg.init(n, d))
    epochs = jnp.asarray(_full_cost(config, oracle) / oracle.local_size, jnp.float32)
    return MarinaState(
        x=x0,
        g=g0.astype(x0.dtype),
        x0=x0,
        step=jnp.zeros((), jnp.int32),
        epochs=epochs,
        full_agg_state=agg.init(ch, d),
        comp_agg_state=agg.init(c, d),
        attack_state=attack_state,
    )


def step(
    config: MarinaConfig, oracle: Oracle, state: MarinaState, params: MarinaParams, key
) -> tuple[MarinaState, dict]:
    """One round ``k -> k + 1`` (see the module docstring); ``key`` is the run key.

    Returns:
      ``(new_state, info)`` with ``info``: ``full`` (``c_k``), ``n_byz`` (Byzantine clients
      sampled), ``byz_majority``, ``radius`` (``lambda_{k+1}``), ``g_norm`` (``||g^{k+1}||``),
      ``epochs`` (cumulative).
    """
    params = _params(params)
    n = config.num_clients
    c, ch = config.sizes
    k = state.step
    rk = round_keys(key, k)
    x, g = state.x, state.g
    dtype = x.dtype
    if config.full_round_every is not None:  # the a9a script: first round of every epoch
        full = (k + 1) % config.full_round_every == 0
    else:
        coin = jax.random.bernoulli(rk.coin, params.p)
        full = coin & (not config.force_p_zero)
    x_new = x - params.lr.astype(dtype) * g
    if config.threshold == "step":
        radius = params.alpha * jnp.sqrt(jnp.sum(jnp.square(x_new - x))).astype(jnp.float32)
    else:
        radius = params.alpha * jnp.sqrt(jnp.sum(jnp.square(g))).astype(jnp.float32)
    perm = jnp.argsort(jax.random.uniform(rk.sample, (n,))).astype(jnp.int32)
    agg = _aggregator(config)

    def full_round(carry):
        full_st, comp_st, att_st = carry
        clients = perm[:ch]
        msgs = _full_messages(config, oracle, x_new, clients, params, rk.grad)
        ctx = _ctx(params, x_new, state.x0, jnp.zeros_like(x_new), k)
        msgs, att_st = _attack(config, msgs, clients, params, rk.attack, att_st, ctx)
        out, full_st = agg.apply(msgs, jnp.ones((ch,), bool), params.f, rk.aggregate, full_st)
        n_byz = jnp.sum((clients < params.f_real).astype(jnp.int32))
        return out.astype(dtype), (full_st, comp_st, att_st), n_byz, ch

    def comp_round(carry):
        full_st, comp_st, att_st = carry
        clients = perm[:c]
        flip = _flip(config, clients, params)
        keys = jax.vmap(lambda i: jax.random.fold_in(rk.grad, i))(clients)
        mb = jax.vmap(oracle.minibatch_grad, in_axes=(None, 0, 0, 0))
        delta = mb(x_new, clients, keys, flip) - mb(x, clients, keys, flip)
        msgs = config.compressor.apply(delta, rk.compress)
        ctx = _ctx(params, x_new, state.x0, g, k)
        msgs, att_st = _attack(config, msgs, clients, params, rk.attack, att_st, ctx)
        valid = jnp.ones((c,), bool)
        if config.clips:
            msgs = clip_rows(msgs, radius, valid)
        if config.variant == "pp_plus":
            out = jnp.mean(msgs.astype(jnp.float32), axis=0)
        else:
            out, comp_st = agg.apply(msgs, valid, params.f, rk.aggregate, comp_st)
        n_byz = jnp.sum((clients < params.f_real).astype(jnp.int32))
        return (g + out.astype(dtype)), (full_st, comp_st, att_st), n_byz, c

    carry = (state.full_agg_state, state.comp_agg_state, state.attack_state)

    def run_full(cy):
        out, cy, nb, _ = full_round(cy)
        return out, cy, nb

    def run_comp(cy):
        out, cy, nb, _ = comp_round(cy)
        return out, cy, nb

    if config.force_p_zero:
        g_new, carry, n_byz = run_comp(carry)
    else:
        g_new, carry, n_byz = lax.cond(full, run_full, run_comp, carry)
    cost_full = ch * _full_cost(config, oracle)
    cost_comp = c * 2 * oracle.batch_size
    cost = jnp.where(full, cost_full, cost_comp).astype(jnp.float32)
    epochs = state.epochs + cost / (n * oracle.local_size)
    size = jnp.where(full, ch, c)
    new_state = MarinaState(
        x=x_new,
        g=g_new,
        x0=state.x0,
        step=k + 1,
        epochs=epochs,
        full_agg_state=carry[0],
        comp_agg_state=carry[1],
        attack_state=carry[2],
    )
    info = {
        "full": full,
        "n_byz": n_byz,
        "byz_majority": 2 * n_byz > size,
        "radius": radius,
        "g_norm": jnp.sqrt(jnp.sum(jnp.square(g_new.astype(jnp.float32)))),
        "epochs": epochs,
    }
    return new_state, info


def build_run(
    config: MarinaConfig,
    oracle: Oracle,
    metric_fn: Callable[[Array], dict] | None = None,
) -> Callable[[Array, MarinaParams, Array], tuple[MarinaState, dict]]:
    """The whole run as a pure function ``run(x0, params, key) -> (final_state, trace)``.

    ``trace`` holds, for every round ``k = 0..K-1``, the ``info`` of :func:`step` and
    ``metric_fn(x^{k+1})`` (a dict of scalars or arrays), stacked along a leading ``[K]`` axis;
    plus ``trace["init"] = metric_fn(x^0)`` when ``metric_fn`` is given. ``run`` is jittable and
    vmappable over ``x0``, ``params`` and ``key``.

    Example (logistic regression, 10 clients holding the same 40 samples, 3 sampled per
    compressed round, the first 3 clients Byzantine with the shift-back attack)::

      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jbyz.aggregators import AGGREGATORS
      >>> a = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
      >>> y = (a @ np.array([1.0, -1.0, 2.0, 0.0]) > 0).astype(np.int32)
      >>> def loss(w, xb, yb):
      ...     return jnp.mean(jnp.logaddexp(0.0, -(2.0 * yb - 1.0) * (xb @ w)))
      >>> oracle = finite_sum_oracle(loss, a, y, np.tile(np.arange(40), (10, 1)), batch_size=8)
      >>> config = MarinaConfig(num_clients=10, num_steps=50,
      ...                       aggregator=AGGREGATORS.build("median"),
      ...                       attack=shift_back(), clients_per_round=3)
      >>> run = jax.jit(build_run(config, oracle, lambda x: {"loss": loss(x, a, y)}))
      >>> params = MarinaParams(lr=0.5, p=0.2, alpha=1.0, f_real=3, f=0)
      >>> keys = jax.random.split(jax.random.key(0), 3)           # 3 seeds
      >>> state, trace = jax.vmap(run, in_axes=(None, None, 0))(jnp.zeros(4), params, keys)
      >>> trace["loss"].shape                                      # [seeds, rounds]
      (3, 50)
      >>> bool(jnp.all(trace["loss"][:, -1] < 0.5 * trace["init"]["loss"]))   # from log 2 ~ 0.69
      True
    """

    def run(x0, params, key):
        state = init(config, oracle, x0, params, key)

        def body(st, _):
            st, info = step(config, oracle, st, params, key)
            if metric_fn is not None:
                info = {**info, **metric_fn(st.x)}
            return st, info

        state, trace = lax.scan(body, state, None, length=config.num_steps)
        if metric_fn is not None:
            trace["init"] = metric_fn(jnp.asarray(x0))
        return state, trace

    return run


def default_aggregator(
    name: str = "median", bucket_size: int = 2, **hyperparameters
) -> tuple[AggregationRule, Sequence[PreAggregator]]:
    """``(aggregator, (bucketing(bucket_size),))`` from the registries (the paper's ARAgg)."""
    from jbyz.aggregators import AGGREGATORS
    from jbyz.preaggregators import bucketing

    pre = (bucketing(bucket_size),) if bucket_size > 1 else ()
    return AGGREGATORS.build(name, **hyperparameters), pre
