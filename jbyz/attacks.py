"""Byzantine attacks: kernels that replace the Byzantine rows of a stack of worker vectors.

Every factory returns a :class:`jbyz.types.Attack` whose ``apply`` maps

  ``(x [n, d], honest [n], byz [n], key, state, ctx) -> (x_out [n, d], new_state)``.

``x`` holds what every worker slot would submit if it were honest (momenta when momentum runs
at the workers). Rows where ``byz`` is False come back unchanged (bit for bit); rows where it is
True are replaced. Slots that are neither honest nor Byzantine (padding, non-participants) are
ignored: they never enter a statistic, so padding the stack changes nothing in the real rows.

Statistics over the honest rows (``H = {i : honest_i}``, ``n_h = |H|``, a traced count)::

  mu    = (1 / n_h) sum_{i in H} x_i
  sigma = sqrt((1 / (n_h - 1)) sum_{i in H} (x_i - mu)^2)      (coordinate-wise, unbiased)

With n_h = 0 the mean is 0; with n_h <= 1 sigma is 0 (the unbiased estimate is undefined there).
Attackers are omniscient: they see the honest vectors of the current round (the threat model of
Baruch et al. 2019 and Karimireddy et al. 2021).

Shapes never depend on the honest or Byzantine counts; every numeric hyper-parameter may be a
traced array (a grid may vmap over ``z``, ``eps``, ``scale``, ``std``, ...); string options are
static and select the program. Iterative attacks use fixed iteration counts.

``ctx`` (declared ``f``, ``step``, ``params``, ...) is accepted for the protocol and unused by the
attacks in this module.

What the caller (simulator / ``jbyz.byzantine``) must do: pass ``byz`` restricted to the slots
that take part this step (``byz & valid``), because ALIE's formula counts ``|honest| + |byz|``
and ``|byz|``; compute the Byzantine workers' vectors on flipped labels when
``attack.flips_labels`` (``label_flip``); and carry ``attack.init(n, d)`` state from step to
step (``mimic(variant="eigen")`` keeps its warm-up statistics there).

Example:
  >>> import jax, jax.numpy as jnp
  >>> attack = ATTACKS.build("alie", z=1.0)          # mu - 1.0 * sigma
  >>> x = jnp.array([[9.0, 9.0], [1.0, 2.0], [3.0, 2.0], [2.0, 2.0]])
  >>> byz = jnp.array([True, False, False, False])
  >>> out, state = attack(x, ~byz, byz, jax.random.key(0))
  >>> out.tolist()
  [[1.0, 2.0], [1.0, 2.0], [3.0, 2.0], [2.0, 2.0]]
"""

from __future__ import annotations

import math
import statistics
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jbyz import _sorting as S
from jbyz.registry import ConfigError, Registry
from jbyz.types import Array, Attack, State

__all__ = [
    "ATTACKS",
    "MimicState",
    "ALIE_DEFAULT_Z",
    "alie",
    "alie_z",
    "alie_z_used",
    "foe",
    "gaussian",
    "honest_mean_std",
    "inf",
    "label_flip",
    "mimic",
    "min_max",
    "min_sum",
    "nan",
    "none",
    "sign_flip",
]

ATTACKS = Registry("attack")

_HIGHEST = jax.lax.Precision.HIGHEST
_MATERIALIZE_MU_MIN_N = 24  # see honest_mean_std

# ALIE's quantile is clipped to [_P_EPS, 1 - _P_EPS] so that z stays finite (|z| <= ~4.75) when
# the Byzantine workers are a majority and Baruch's formula leaves (0, 1).
_P_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def honest_mean_std(x: Array, honest: Array, with_std: bool = True) -> tuple[Array, Array | None]:
    r"""Masked mean and unbiased coordinate-wise std of the honest rows.

    .. math:: \mu = \frac{1}{n_h} \sum_{i \in H} x_i, \qquad
              \sigma = \sqrt{\frac{1}{n_h - 1} \sum_{i \in H} (x_i - \mu)^2}

    Both sums are unrolled over the (static) worker count as element-wise row sums
    (:func:`jbyz._sorting.weighted_row_sum`): one contiguous pass over ``[n, d]`` each, and a
    non-honest row (NaN or Inf included) contributes exactly 0. From ``n >= 24`` on, ``mu`` is
    materialised (:func:`jbyz._sorting.materialize`) before the deviations; otherwise XLA:CPU
    fuses the whole n-row mean into every one of the ``n`` deviation rows (n^2 row reads).
    Measured (Fashion-MNIST MLP, ALIE, worker momentum, ratio of the step to the bare-gradient
    floor, mean / median rule): n = 51: 1.63 / 1.95 with the earlier masked ``(1, n) @ (n, d)``
    matmuls, 1.47 / 1.79 materialised, 3.28 / 3.87 not; n = 10: 1.47 / 1.54 matmuls,
    1.49 / 1.50 materialised, 1.21 / 1.29 not (the rows are in cache).

    Args:
      x: ``[n, d]`` worker vectors.
      honest: ``[n]`` bool mask of the honest rows.
      with_std: also compute the standard deviation.

    Returns:
      ``(mu [d], sigma [d])`` in float32 (``sigma`` is ``None`` when ``with_std`` is False).
    """
    x = x.astype(jnp.float32)
    w = honest.astype(jnp.float32)
    n_h = jnp.sum(w)
    mu = S.weighted_row_sum(w, x) / jnp.maximum(n_h, 1.0)
    if not with_std:
        return mu, None
    if x.shape[0] >= _MATERIALIZE_MU_MIN_N:
        mu = S.materialize(mu)
    dev = [jnp.square(x[i] - mu) for i in range(x.shape[0])]
    var = S.weighted_row_sum(w, dev) / jnp.maximum(n_h - 1.0, 1.0)
    return mu, jnp.sqrt(var)


def _replace_byz(x: Array, byz: Array, mal: Array) -> Array:
    """Rows where ``byz`` is set become ``mal`` (``[d]`` broadcast or ``[n, d]``); others stay."""
    mal = jnp.broadcast_to(jnp.asarray(mal).astype(x.dtype), x.shape)
    return jnp.where(byz[:, None], mal, x)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"attack option {name}={value!r} is not valid. Valid: {', '.join(map(repr, allowed))}."
        )


def _safe_normalize(v: Array, fallback: Array) -> Array:
    """``v / ||v||``, or ``fallback`` where ``||v|| == 0``."""
    nrm = jnp.sqrt(jnp.vdot(v, v))
    return jnp.where(nrm > 0, v / jnp.where(nrm > 0, nrm, 1.0), fallback)


# --------------------------------------------------------------------------------------------
# Trivial attacks
# --------------------------------------------------------------------------------------------


@ATTACKS.register("none", "No attack: Byzantine workers behave honestly.", "-")
def none() -> Attack:
    """No attack: every row comes back as submitted.

    Returns:
      An :class:`~jbyz.types.Attack` whose ``apply`` returns ``x`` unchanged.
    """

    def apply(x, honest, byz, key, state, ctx):
        del honest, byz, key, ctx
        return x, state

    return Attack(name="none", apply=apply)


@ATTACKS.register(
    "bit_flip",
    "Alias of sign_flip: Byzantine workers send scale * their own vector (default -1).",
    "Karimireddy et al., ICML 2021 (arXiv:2012.10333); Allen-Zhu et al., ICLR 2021",
)
@ATTACKS.register(
    "sign_flip",
    "Byzantine workers send scale * their own honest vector (default -1; ByzSGDnm uses -10).",
    "Karimireddy et al., ICML 2021 (arXiv:2012.10333); Allen-Zhu et al., ICLR 2021",
)
def sign_flip(scale: float = -1.0) -> Attack:
    """Sign (bit) flipping: each Byzantine worker sends a scaled copy of its own vector.

    .. math:: x_i^{\\text{out}} = s \\cdot x_i \\quad (i \\text{ Byzantine})

    ``s = -1`` is the bit-flipping attack of Karimireddy et al.; ByzSGDnm uses ``s = -10``.
    Each Byzantine row flips its own vector (rows differ).

    Args:
      scale: the factor ``s`` (float or traced scalar).

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Karimireddy, He, Jaggi. Learning from History for Byzantine Robust Optimization. ICML 2021.
    """

    def apply(x, honest, byz, key, state, ctx):
        del honest, key, ctx
        mal = jnp.asarray(scale, jnp.float32) * x.astype(jnp.float32)
        return _replace_byz(x, byz, mal), state

    return Attack(name="sign_flip", apply=apply, needs_own_vector=True)


@ATTACKS.register(
    "label_flip",
    "Data-level: Byzantine workers compute their gradient on labels C-1-y.",
    "Allen-Zhu et al., ICLR 2021; Karimireddy et al., ICLR 2022 (arXiv:2006.09365)",
)
def label_flip() -> Attack:
    """Label flipping: Byzantine workers train honestly on flipped labels ``y -> C - 1 - y``.

    This is a data-level attack (``flips_labels=True``): the simulator computes the Byzantine
    workers' vectors on flipped labels, and ``apply`` returns the rows as submitted.

    Returns:
      An :class:`~jbyz.types.Attack` with ``flips_labels=True``.
    """

    def apply(x, honest, byz, key, state, ctx):
        del honest, byz, key, ctx
        return x, state

    return Attack(name="label_flip", apply=apply, flips_labels=True)


@ATTACKS.register("inf", "Byzantine workers send +inf in every coordinate.", "-")
def inf() -> Attack:
    """Byzantine rows become ``+inf`` (tests that a rule is not poisoned by non-finite inputs).

    Returns:
      An :class:`~jbyz.types.Attack`.
    """

    def apply(x, honest, byz, key, state, ctx):
        del honest, key, ctx
        return _replace_byz(x, byz, jnp.inf), state

    return Attack(name="inf", apply=apply)


@ATTACKS.register("nan", "Byzantine workers send NaN in every coordinate.", "-")
def nan() -> Attack:
    """Byzantine rows become ``NaN`` (tests that a rule is not poisoned by non-finite inputs).

    Returns:
      An :class:`~jbyz.types.Attack`.
    """

    def apply(x, honest, byz, key, state, ctx):
        del honest, key, ctx
        return _replace_byz(x, byz, jnp.nan), state

    return Attack(name="nan", apply=apply)


# --------------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------------


@ATTACKS.register(
    "gaussian",
    "Byzantine workers send N(0, std^2 I) (default std^2 = 200), optionally centred on mu.",
    "Xie, Koyejo, Gupta. Generalized Byzantine-tolerant SGD, arXiv:1802.10116 (2018)",
)
def gaussian(std: float = math.sqrt(200.0), centered: bool = False) -> Attack:
    """Gaussian noise: each Byzantine worker sends an independent Gaussian vector.

    .. math:: x_i^{\\text{out}} = c + s\\,\\xi_i, \\qquad \\xi_i \\sim \\mathcal N(0, I_d),

    with ``c = 0`` or ``c = mu`` (``centered=True``). Row ``i`` draws its noise from
    ``jax.random.fold_in(key, i)``, so it does not depend on the stack's padding.

    Args:
      std: the standard deviation ``s`` (float or traced scalar; default ``sqrt(200)``).
      centered: static; add the honest mean ``mu``.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Xie, Koyejo, Gupta. Generalized Byzantine-tolerant SGD. arXiv:1802.10116, 2018.
    """

    def apply(x, honest, byz, key, state, ctx):
        del ctx
        n, d = x.shape
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(n))
        noise = jax.vmap(lambda k: jax.random.normal(k, (d,), jnp.float32))(keys)
        mal = jnp.asarray(std, jnp.float32) * noise
        if centered:
            mu, _ = honest_mean_std(x, honest, with_std=False)
            mal = mal + mu
        return _replace_byz(x, byz, mal), state

    return Attack(name="gaussian", apply=apply)


# --------------------------------------------------------------------------------------------
# ALIE
# --------------------------------------------------------------------------------------------


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s ALIE factor ``z`` for ``n`` workers of which ``f`` are Byzantine (host).

    .. math::
       s = \\lfloor n/2 + 1 \\rfloor - f, \\qquad
       z = \\Phi^{-1}\\!\\left(\\frac{n - f - s}{n - f}\\right)

    The quantile is clipped to ``[1e-6, 1 - 1e-6]`` (as in the traced version used by
    :func:`alie`), so ``z`` stays finite when the Byzantine workers are a majority.

    Examples:
      >>> round(alie_z(8, 3), 4)
      0.2533
      >>> round(alie_z(51, 24), 4)
      1.4461
      >>> round(alie_z(25, 11), 4)
      1.0676
      >>> round(alie_z(51, 12), 4)
      0.3612
      >>> round(alie_z(8, 1), 2)  # the formula gives a negative z for small f
      -0.18

    Args:
      n: number of (valid) workers.
      f: number of Byzantine workers among them.

    Returns:
      ``z`` as a Python float.
    """
    n, f = int(n), int(f)
    n_h = n - f
    if n_h <= 0:
        raise ValueError(f"alie_z needs at least one honest worker, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = float(np.clip((n_h - s) / n_h, _P_EPS, 1.0 - _P_EPS))
    return statistics.NormalDist().inv_cdf(p)


def _alie_z_traced(honest: Array, byz: Array) -> Array:
    """:func:`alie_z` from the masks, in-graph (counts stay traced)."""
    f = jnp.sum(byz, dtype=jnp.int32)
    n = jnp.sum(honest | byz, dtype=jnp.int32)
    s = n // 2 + 1 - f
    n_h = n - f
    p = (n_h - s).astype(jnp.float32) / jnp.maximum(n_h, 1).astype(jnp.float32)
    p = jnp.clip(p, _P_EPS, 1.0 - _P_EPS)
    return jax.scipy.special.ndtri(p)


ALIE_DEFAULT_Z = 1.5
"""ALIE's default ``z``: ByzFL's default and the fixed value of El Mhamdi et al.'s code."""

_ALIE_WEAK_Z = 0.5  # below this |z|, Baruch's formula leaves ALIE (nearly) harmless


def alie_z_used(z, n: int, f_real: int, *, warn: bool = True) -> float | None:
    """The ``z`` an :func:`alie` attack uses with ``n`` workers of which ``f_real`` are Byzantine.

    ``z`` as given when it is a number (``None`` when traced), :func:`alie_z` for
    ``z="baruch"``; then, with ``warn``, a ``UserWarning`` when ``|z| < 0.5``: the formula makes
    the attack (nearly) a no-op at this setting (z = 0.18 at n = 10, f = 3; z <= 0 at n = 8, f = 2).
    """
    from jbyz.registry import concrete_number

    if isinstance(z, str):
        if int(f_real) <= 0 or int(f_real) >= int(n):
            return None
        v = alie_z(n, f_real)
        if warn and abs(v) < _ALIE_WEAK_Z:
            import warnings

            warnings.warn(
                f"ALIE with Baruch et al.'s z: z = {v:.3f} at n={n}, f_real={f_real} (|z| < "
                f"{_ALIE_WEAK_Z}): the Byzantine vectors are within {abs(v):.2f} std of the honest "
                f"mean and the attack is (nearly) a no-op. Set z (e.g. the default "
                f"{ALIE_DEFAULT_Z}) for an attack.", UserWarning, stacklevel=3)
        return v
    c = concrete_number(z)
    return None if c is None else float(c)


@ATTACKS.register(
    "alie",
    "A Little Is Enough: send mu - z*sigma (z = 1.5 by default; z = 'baruch': Baruch's formula).",
    "Baruch, Baruch, Goldberg. A Little Is Enough, NeurIPS 2019 (arXiv:1902.06156)",
)
def alie(z: float | str = ALIE_DEFAULT_Z, sign: str = "minus") -> Attack:
    """A Little Is Enough: all Byzantine workers send a small coordinate-wise shift of the mean.

    .. math:: x^{\\text{out}} = \\mu - z\\,\\sigma \\quad (\\text{sign="minus"}), \\qquad
              \\mu + z\\,\\sigma \\quad (\\text{sign="plus"})

    The default ``z = 1.5`` is an attack at every setting: it is ByzFL's default and the fixed
    value of El Mhamdi et al.'s code (ICLR 2021, ``mu - 1.5 sigma``). With ``z="baruch"`` the
    factor follows Baruch et al.'s formula (computed in-graph from the masks, with ``n`` the
    valid count ``|honest| + |byz|`` and ``f = |byz|`` the real Byzantine count):
    ``s = floor(n/2 + 1) - f``, ``z = Phi^{-1}((n - f - s)/(n - f))`` (see :func:`alie_z`). The
    formula is small for few Byzantine workers (z = 0.18 at n = 10, f = 3; z <= 0 at n = 8,
    f = 2, where the "attack" is a no-op or helps): :func:`alie_z_used` warns when it gives
    ``|z| < 0.5``. Until jbyz 0.1 the formula was the default; results tables record the ``z``
    used (column ``attack.z``) and a run's id includes it, so results computed with the former
    default are never taken for the new one (ask for them with ``z="baruch"``).

    The paper subtracts (``"minus"``, default); ByzFL adds (``"plus"``).

    Args:
      z: the factor (float or traced scalar, default 1.5), or ``"baruch"`` for Baruch's formula.
        ``None`` (the former spelling of the formula) is deprecated.
      sign: static, ``"minus"`` or ``"plus"``.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Baruch, Baruch, Goldberg. A Little Is Enough: Circumventing Defenses For Distributed
      Learning. NeurIPS 2019. ByzFL (EPFL DCL): ``ALittleIsEnough``, ``tau = 1.5``. El Mhamdi,
      Guerraoui, Rouault. Distributed Momentum for Byzantine-resilient Stochastic Gradient
      Descent. ICLR 2021.
    """
    _check_choice("sign", sign, ("minus", "plus"))
    if z is None:
        import warnings

        warnings.warn("alie(z=None) is deprecated: Baruch et al.'s formula is z='baruch'; the "
                      f"default is now z={ALIE_DEFAULT_Z}", DeprecationWarning, stacklevel=2)
        z = "baruch"
    if isinstance(z, str) and z != "baruch":
        raise ConfigError(f"alie z must be a number or 'baruch' (Baruch et al.'s formula), got {z!r}")
    direction = -1.0 if sign == "minus" else 1.0
    formula = isinstance(z, str)

    def apply(x, honest, byz, key, state, ctx):
        del key, ctx
        mu, sigma = honest_mean_std(x, honest)
        zz = _alie_z_traced(honest, byz) if formula else jnp.asarray(z, jnp.float32)
        mal = mu + direction * zz * sigma
        return _replace_byz(x, byz, mal), state

    return Attack(name="alie", apply=apply,
                  resolved=lambda n, f_real: {"z": alie_z_used(z, n, f_real)})


def resolved_columns(name: str, kwargs, n: int, f_real: int) -> dict:
    """``{"attack.<hyper-parameter>": value}`` for the hyper-parameters an attack resolves from
    the setting (:attr:`jbyz.types.Attack.resolved`; ALIE's ``z``): what results rows record."""
    attack = ATTACKS.build(name, **dict(kwargs))
    return {f"attack.{k}": v for k, v in attack.resolved(int(n), int(f_real)).items()}


# --------------------------------------------------------------------------------------------
# Fall of Empires / IPM
# --------------------------------------------------------------------------------------------


@ATTACKS.register(
    "ipm",
    "Alias of foe (inner-product manipulation): send -eps * mu (default eps = 0.1).",
    "Xie, Koyejo, Gupta. Fall of Empires, UAI 2019 (arXiv:1903.03936)",
)
@ATTACKS.register(
    "foe",
    "Fall of Empires / inner-product manipulation: send -eps * mu (default eps = 0.1).",
    "Xie, Koyejo, Gupta. Fall of Empires, UAI 2019 (arXiv:1903.03936)",
)
def foe(eps: float = 0.1) -> Attack:
    """Fall of Empires (inner-product manipulation): send a negatively scaled honest mean.

    .. math:: x^{\\text{out}} = -\\varepsilon\\,\\mu

    ``eps = 0.1`` everywhere it was found (ByzantineMomentum's ``(1 - 1.1) mu`` is the same
    vector); larger values (e.g. 100) also appear in the literature.

    Args:
      eps: ``epsilon`` (float or traced scalar).

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Xie, Koyejo, Gupta. Fall of Empires: Breaking Byzantine-tolerant SGD by Inner Product
      Manipulation. UAI 2019.
    """

    def apply(x, honest, byz, key, state, ctx):
        del key, ctx
        mu, _ = honest_mean_std(x, honest, with_std=False)
        return _replace_byz(x, byz, -jnp.asarray(eps, jnp.float32) * mu), state

    return Attack(name="foe", apply=apply)


# --------------------------------------------------------------------------------------------
# Mimic
# --------------------------------------------------------------------------------------------


class MimicState(NamedTuple):
    """State of ``mimic(variant="eigen")``.

    Attributes:
      step: ``int32[]`` warm-up steps taken so far (stops at ``warmup``).
      mean: ``[d]`` running mean of the honest means over the warm-up.
      direction: ``[d]`` running top eigenvector ``z`` (unit norm).
      target: ``int32[]`` worker slot being copied.
    """

    step: Array
    mean: Array
    direction: Array
    target: Array


def _honest_rank_index(honest: Array, target) -> Array:
    """Index of the honest row of rank ``min(target, n_h - 1)`` (0 when no row is honest)."""
    rank = jnp.cumsum(honest.astype(jnp.int32)) - 1
    n_h = jnp.sum(honest, dtype=jnp.int32)
    want = jnp.clip(jnp.asarray(target, jnp.int32), 0, jnp.maximum(n_h - 1, 0))
    return jnp.argmax(honest & (rank == want)).astype(jnp.int32)


@ATTACKS.register(
    "mimic",
    "All Byzantine workers copy one honest worker (the first, or the top-eigenvector variant).",
    "Karimireddy, He, Jaggi. Byzantine-Robust Learning on Heterogeneous Datasets via "
    "Bucketing, ICLR 2022 (arXiv:2006.09365)",
)
def mimic(variant: str = "first", target: int = 0, warmup: int = 1) -> Attack:
    """Mimic: every Byzantine worker sends a copy of one honest worker's vector.

    ``variant="first"``: copy the honest worker of rank ``target`` among this step's honest rows
    (``0`` = the first honest worker; clipped to the last one).

    ``variant="eigen"`` (Karimireddy et al. 2022): during the first ``warmup`` steps the state
    tracks a running mean ``m`` and a running top eigenvector ``z`` of the centred honest vectors
    by one power-iteration step per round (``z_0`` is a fixed random unit vector),

    .. math::
       m_t = \\tfrac{t}{t+1} m_{t-1} + \\tfrac{1}{t+1}\\mu_t, \\quad
       u = \\sum_{i\\in H} \\langle x_i - m_t, z_{t-1}\\rangle (x_i - m_t), \\quad
       z_t = \\frac{\\tfrac{t}{t+1} z_{t-1} + \\tfrac{1}{t+1} u / \\|u\\|}
                   {\\|\\cdot\\|},

    and the Byzantine workers copy the honest worker maximising ``|<x_i, z_t>|``. After the
    warm-up, that worker is kept (if it is not honest in some later step, the current maximiser
    is copied for that step). The state is a :class:`MimicState` ``(t, m, z, target)``.

    Args:
      variant: static, ``"first"`` or ``"eigen"``.
      target: ``"first"`` only: rank among the honest rows (int or traced scalar).
      warmup: ``"eigen"`` only: number of warm-up steps ``W`` (int or traced scalar; the
        reference code's default is 1).

    Returns:
      An :class:`~jbyz.types.Attack`; with ``"eigen"`` its ``init(n, d)`` builds the state.

    References:
      Karimireddy, He, Jaggi. Byzantine-Robust Learning on Heterogeneous Datasets via
      Bucketing. ICLR 2022.
    """
    _check_choice("variant", variant, ("first", "eigen"))

    if variant == "first":

        def apply(x, honest, byz, key, state, ctx):
            del key, ctx
            idx = _honest_rank_index(honest, target)
            return _replace_byz(x, byz, x[idx]), state

        return Attack(name="mimic", apply=apply)

    def init(n: int, d: int) -> State:
        del n
        z0 = jax.random.normal(jax.random.key(0), (d,), jnp.float32)
        z0 = z0 / jnp.linalg.norm(z0)
        zero = jnp.zeros((), jnp.int32)
        return MimicState(zero, jnp.zeros((d,), jnp.float32), z0, zero)

    def apply_eigen(x, honest, byz, key, state, ctx):
        del key, ctx
        t, m, z, tgt = state
        xf = x.astype(jnp.float32)
        in_warmup = t < jnp.asarray(warmup, jnp.int32)
        tf = t.astype(jnp.float32)
        a, b = tf / (tf + 1.0), 1.0 / (tf + 1.0)

        mu, _ = honest_mean_std(xf, honest, with_std=False)
        m_new = a * m + b * mu
        y = jnp.where(honest[:, None], xf - m_new, 0.0)
        w = jnp.matmul(y, z, precision=_HIGHEST)
        u = jnp.matmul(w[None, :], y, precision=_HIGHEST)[0]
        u = _safe_normalize(u, jnp.zeros_like(u))
        z_new = _safe_normalize(a * z + b * u, z)

        z_cur = jnp.where(in_warmup, z_new, z)
        proj = jnp.abs(jnp.matmul(jnp.where(honest[:, None], xf, 0.0), z_cur, precision=_HIGHEST))
        best = jnp.argmax(jnp.where(honest, proj, -1.0)).astype(jnp.int32)

        tgt_new = jnp.where(in_warmup, best, tgt)
        idx = jnp.where(honest[tgt_new], tgt_new, best)
        new_state = MimicState(
            jnp.where(in_warmup, t + 1, t),
            jnp.where(in_warmup, m_new, m),
            z_cur,
            tgt_new,
        )
        return _replace_byz(x, byz, x[idx]), new_state

    return Attack(name="mimic", apply=apply_eigen, init=init)


# --------------------------------------------------------------------------------------------
# Min-max / min-sum
# --------------------------------------------------------------------------------------------


def _perturbation(kind: str, mu: Array, sigma: Array) -> Array:
    if kind == "std":
        return -sigma
    if kind == "unit":
        return -_safe_normalize(mu, jnp.zeros_like(mu))
    return -jnp.sign(mu)


def _shejwalkar(x, honest, byz, objective: str, perturbation: str, iters: int):
    """Shared body of :func:`min_max` and :func:`min_sum`; returns ``(x_out, gamma)``."""
    xf = x.astype(jnp.float32)
    mu, sigma = honest_mean_std(xf, honest)
    p = _perturbation(perturbation, mu, sigma)

    y = jnp.where(honest[:, None], xf - mu, 0.0)  # centred honest rows (better conditioning)
    gram = S.gram(y)
    sq = jnp.diagonal(gram)  # ||h_i - mu||^2
    pair = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)  # ||h_i - h_j||^2
    hh = honest[:, None] & honest[None, :]
    pair = jnp.where(hh, pair, 0.0)
    yp = jnp.matmul(y, p, precision=_HIGHEST)  # <h_i - mu, p>
    c = jnp.vdot(p, p)
    n_h = jnp.sum(honest.astype(jnp.float32))

    def dist2(g):  # ||mu + g p - h_i||^2 for every row
        return sq - 2.0 * g * yp + g * g * c

    safe_c = jnp.where(c > 0, c, 1.0)
    if objective == "max":
        bound = jnp.max(pair)  # max_{i,j in H} ||h_i - h_j||^2

        def feasible(g):
            return jnp.max(jnp.where(honest, dist2(g), -jnp.inf)) <= bound

        # ||mal - h_i|| >= g ||p|| - ||mu - h_i|| and ||mu - h_i|| <= D, so g <= 2D / ||p||;
        # bracket with a factor 2 of slack.
        hi = 4.0 * jnp.sqrt(bound / safe_c)
    else:
        bound = jnp.max(jnp.sum(pair, axis=1))  # max_{i in H} sum_{j in H} ||h_i - h_j||^2

        def feasible(g):
            return jnp.sum(jnp.where(honest, dist2(g), 0.0)) <= bound

        # sum_i ||mal - h_i||^2 >= n_h g^2 ||p||^2, so g <= sqrt(bound / (n_h ||p||^2));
        # bracket with a factor 2 of slack.
        hi = 2.0 * jnp.sqrt(bound / (jnp.maximum(n_h, 1.0) * safe_c))
    hi = jnp.where(c > 0, hi, 0.0)

    def body(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        ok = feasible(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    gamma, _ = jax.lax.fori_loop(0, iters, body, (jnp.zeros_like(hi), hi))
    mal = mu + gamma * p
    return _replace_byz(x, byz, mal), gamma


_PERTURBATIONS = ("std", "unit", "sign")


@ATTACKS.register(
    "min_max",
    "Send mu + gamma*p with the largest gamma keeping max_i ||mal - h_i|| <= max_ij ||h_i - h_j||.",
    "Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021",
)
def min_max(perturbation: str = "std", iters: int = 40) -> Attack:
    """Min-max (AGR-agnostic): the farthest point along ``p`` that is no outlier in max distance.

    .. math::
       x^{\\text{out}} = \\mu + \\gamma^\\star p, \\quad
       \\gamma^\\star = \\max\\{\\gamma \\ge 0 : \\max_{i\\in H}\\|\\mu + \\gamma p - h_i\\|
                         \\le \\max_{i,j\\in H}\\|h_i - h_j\\|\\},

    with ``p = -sigma`` (``"std"``), ``-mu/||mu||`` (``"unit"``) or ``-sign(mu)`` (``"sign"``).
    The feasible set is an interval ``[0, gamma*]`` (a sub-level set of a convex function of
    ``gamma`` containing 0); ``gamma*`` is found by ``iters`` bisection steps on
    ``[0, 4 D / ||p||]``, which contains it. Distances come from the Gram matrix of the centred
    honest rows.

    Args:
      perturbation: static, ``"std"``, ``"unit"`` or ``"sign"``.
      iters: static number of bisection steps.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Shejwalkar, Houmansadr. Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
      Defenses for Federated Learning. NDSS 2021.
    """
    _check_choice("perturbation", perturbation, _PERTURBATIONS)

    def apply(x, honest, byz, key, state, ctx):
        del key, ctx
        out, _ = _shejwalkar(x, honest, byz, "max", perturbation, int(iters))
        return out, state

    return Attack(name="min_max", apply=apply)


@ATTACKS.register(
    "min_sum",
    "Send mu + gamma*p with the largest gamma keeping sum_i ||mal - h_i||^2 <= max_i sum_j "
    "||h_i - h_j||^2.",
    "Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021",
)
def min_sum(perturbation: str = "std", iters: int = 40) -> Attack:
    """Min-sum (AGR-agnostic): the farthest point along ``p`` that is no outlier in summed distance.

    .. math::
       x^{\\text{out}} = \\mu + \\gamma^\\star p, \\quad
       \\gamma^\\star = \\max\\{\\gamma \\ge 0 : \\sum_{i\\in H}\\|\\mu + \\gamma p - h_i\\|^2
                         \\le \\max_{i\\in H} \\sum_{j\\in H}\\|h_i - h_j\\|^2\\},

    with ``p`` as in :func:`min_max`. (Since ``mu`` is the honest mean the constraint reduces to
    ``gamma <= max_i ||h_i - mu|| / ||p||``; the kernel still bisects, ``iters`` steps, so the
    returned ``gamma`` satisfies the constraint as evaluated in float32.)

    Args:
      perturbation: static, ``"std"``, ``"unit"`` or ``"sign"``.
      iters: static number of bisection steps.

    Returns:
      An :class:`~jbyz.types.Attack`.

    References:
      Shejwalkar, Houmansadr. Manipulating the Byzantine: Optimizing Model Poisoning Attacks and
      Defenses for Federated Learning. NDSS 2021.
    """
    _check_choice("perturbation", perturbation, _PERTURBATIONS)

    def apply(x, honest, byz, key, state, ctx):
        del key, ctx
        out, _ = _shejwalkar(x, honest, byz, "sum", perturbation, int(iters))
        return out, state

    return Attack(name="min_sum", apply=apply)


# --------------------------------------------------------------------------------------------
# Rule-aware attacks (optimal ALIE / IPM, the gradient attack) and rule-specific ones (Fang et
# al., Blades): the kernels live in jbyz/attacks_extra.py, which imports this module; the
# registry imports it on first use of one of these names, so the dependency points one way.

for _name in ("optimal_ipm", "optimal_alie", "gradient_ascent", "fang_trim", "fang_krum",
              "signguard_attack", "clipped_clustering_attack"):
    ATTACKS.provided_by(_name, "jbyz.attacks_extra")
del _name
