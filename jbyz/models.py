"""Flax NNX models and the functional adapter the simulator uses inside jit / vmap / scan.

Every model is a Flax NNX module whose ``__call__(x, *, train, key)`` returns logits. The simulator
never touches the module objects: :func:`build_model` splits a module into a static ``graphdef``,
a pytree of trainable ``params`` and a pytree of non-trainable ``state`` (BatchNorm running
statistics), all plain nested ``dict``s of float32 arrays, and :meth:`FunctionalModel.apply` is a
pure function of ``(params, state, x, key)``:

  >>> import jax, jax.numpy as jnp
  >>> m = build_model("mlp", (8, 8, 1), 10, key=jax.random.key(0))
  >>> logits, _ = m.apply(m.params, m.state, jnp.zeros((4, 8, 8, 1)), train=False)
  >>> logits.shape
  (4, 10)

Images are NHWC. Flatten sizes are computed from ``input_shape`` at construction, so every model
works for 8x8x1 digits, 28x28x1 (Fashion-)MNIST and 32x32x3 CIFAR inputs.

Registered models (``MODELS``):

* ``logreg``: multinomial logistic regression (one linear layer).
* ``mlp``: fully connected ReLU network, default 784-100-10 (the ``simples-full`` model of
  El-Mhamdi et al. 2021 and ByzFL's ``fc_mnist``).
* ``lenet``: conv5x5(32)-ReLU-maxpool2-conv5x5(64)-ReLU-maxpool2-FC (a LeNet-style small CNN;
  LeCun et al. 1998); VALID convolutions for inputs >= 16x16, SAME for smaller ones.
* ``dm_cnn``: the CIFAR CNN of El-Mhamdi, Guerraoui & Rouault (ICLR 2021, ``empire-cnn``), with
  BatchNorm and dropout.
* ``resnet20``: the CIFAR ResNet-20 of He et al. (2016) with BatchNorm, or with GroupNorm
  (Wu & He 2018) for non-i.i.d. experiments.

Convolutions use a custom kernel gradient by default (``fast_conv_grad=True``; same numbers):
XLA:CPU computes XLA's own kernel gradient ~20x slower inside ``lax.scan`` / ``fori_loop`` bodies
than at top level (jax-ml/jax#12868), and the simulator runs whole trainings in ``lax.scan``. The
custom gradient is reverse-mode only; build with ``fast_conv_grad=False`` for ``jax.jvp`` /
``jax.hessian`` through conv models.

BatchNorm conventions: PyTorch's (running-average momentum 0.1, i.e. Flax ``momentum=0.9``,
epsilon 1e-5). In ``train=True`` mode the batch statistics of the batch given to ``apply`` are used
and the running averages returned; under ``vmap`` over workers each worker normalises with its own
batch (as separate machines would) and returns its own running stats: the caller decides how to
combine them (e.g. keep worker 0's, or average).

References:
  LeCun, Bottou, Bengio & Haffner (1998), Gradient-based learning applied to document recognition.
  He, Zhang, Ren & Sun (2016), Deep residual learning for image recognition (CVPR).
  Wu & He (2018), Group normalization (ECCV).
  El-Mhamdi, Guerraoui & Rouault (2021), Distributed momentum for Byzantine-resilient stochastic
  gradient descent (ICLR).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jbyz.registry import ConfigError, Registry

MODELS = Registry("model")

__all__ = [
    "MODELS",
    "FunctionalModel",
    "build_model",
    "num_params",
    "per_worker_grads",
    "has_convolutions",
]

_BN_MOMENTUM = 0.9  # Flax convention (weight of the old average) == PyTorch momentum 0.1
_BN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"model {name!r} needs image inputs of shape (H, W, C) (NHWC batches); got input_shape "
            f"{tuple(input_shape)}. Use 'logreg' or 'mlp' for vector inputs."
        )
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def _pool_out(size: int) -> int:
    return size // 2  # nnx/lax max_pool with window 2, stride 2, VALID padding


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size if padding == "SAME" else size - kernel + 1


def _max_pool(x):
    """2x2 max pooling, stride 2, VALID (odd trailing rows/columns dropped), NHWC.

    Written as a reshape + max rather than ``lax.reduce_window``: its gradient is then elementwise
    instead of XLA's ``select_and_scatter``, which is markedly slower on CPU
    (``benchmarks/NOTES_cnn.md``).
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


# Initialisers computed on the host with numpy (seeded from the JAX key) when the key is concrete:
# eager NNX construction with JAX's samplers compiles one small XLA program per distinct
# parameter shape (~5-10 s for a CNN on a 2-core CPU); numpy takes milliseconds. Under a trace
# (e.g. ``nnx.eval_shape``) the equivalent JAX initialiser is used. Distributions match Flax's
# defaults: LeCun normal (truncated at 2 std) for kernels, zeros for biases, He normal (fan_out)
# for ResNet convolutions.


def _host_rng(key) -> np.random.Generator:
    words = np.asarray(jax.random.key_data(key)).ravel()
    return np.random.default_rng([int(w) for w in words])


def _variance_scaling(scale: float, mode: str, distribution: str):
    jax_init = nnx.initializers.variance_scaling(scale, mode, distribution)

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            return jax_init(key, shape, dtype)
        shape = tuple(int(s) for s in shape)
        receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        std = math.sqrt(scale / fan)
        rng = _host_rng(key)
        z = rng.standard_normal(shape)
        if distribution == "truncated_normal":
            std /= 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
            bad = np.abs(z) > 2
            while bad.any():
                z[bad] = rng.standard_normal(int(bad.sum()))
                bad = np.abs(z) > 2
        return jnp.asarray((z * std).astype(np.dtype(dtype)))

    return init


def _constant(value: float):
    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(np.full(tuple(shape), value, dtype=np.dtype(dtype)))

    return init


_lecun_normal = _variance_scaling(1.0, "fan_in", "truncated_normal")
_he_normal = _variance_scaling(2.0, "fan_out", "normal")
_zeros, _ones = _constant(0.0), _constant(1.0)


def _torch_uniform(fan_in: int):
    r"""PyTorch's default ``nn.Linear`` / ``nn.Conv2d`` initialisation for weights and biases:
    :math:`U(-1/\sqrt{\text{fan\_in}}, 1/\sqrt{\text{fan\_in}})` (``kaiming_uniform_`` with
    ``a = sqrt(5)`` gives this bound for the weights; the biases use the same bound), i.e. a
    standard deviation of :math:`1/\sqrt{3\,\text{fan\_in}}`."""
    bound = 1.0 / math.sqrt(max(int(fan_in), 1))

    def init(key, shape, dtype=jnp.float32):
        if isinstance(key, jax.core.Tracer):
            return jax.random.uniform(key, shape, dtype, -bound, bound)
        u = _host_rng(key).uniform(-bound, bound, tuple(int(s) for s in shape))
        return jnp.asarray(u.astype(np.dtype(dtype)))

    return init


INITS = ("lecun", "torch")


def _check_init(model: str, init: str) -> str:
    if init not in INITS:
        raise ConfigError(
            f"{model} init must be one of {', '.join(map(repr, INITS))}, got {init!r} "
            "('lecun': LeCun normal weights, zero biases; 'torch': PyTorch's default uniform "
            "weights and biases)"
        )
    return init


# --------------------------------------------------------------------------------------------
# convolution with a loop-friendly kernel gradient
# --------------------------------------------------------------------------------------------
#
# XLA:CPU computes the kernel gradient of a convolution ~20-25x slower when it sits inside a
# while-loop body (lax.scan / fori_loop / lax.map) than at the top level of a program
# (jax-ml/jax#12868; benchmarks/NOTES_cnn.md): 206 ms vs 8.5 ms for lenet's second conv on 32
# images. The forward and input-gradient convolutions are not affected. Writing the kernel
# gradient as an ordinary NHWC convolution of explicitly transposed operands,
#   dW[kh, kw, ci, co] = sum_{b, h, w} xpad[b, s*h + kh, s*w + kw, ci] * dy[b, h, w, co]
#                      = conv(lhs = xpad^T [ci, H, W, b], rhs = dy^T [h, w, b, co],
#                             rhs_dilation = s)[ci, kh, kw, co],
# gives the same numbers at top-level speed inside loops too (8.1 ms). The input gradient of a
# stride-1 convolution has the same problem, milder (lenet's conv2: ~2x slower per worker inside
# a scan, 2026-11-30), and is written as an ordinary convolution of dy with the flipped kernel,
#   dx = conv(dy, rev(w)^{ci <-> co}, padding = (k - 1 - lo, k - 1 - hi)).
# With both, lenet's per-worker gradient costs the same inside lax.scan as at top level (13 ms
# on 32 images, one core; PyTorch 2.13 with oneDNN: 15 ms). Only reverse mode is
# defined (a custom_vjp): forward-mode AD (jax.jvp, jacfwd, hessian) through these convolutions
# needs the model built with fast_conv_grad=False.

_NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d(x, w, strides, pads, precision):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _conv2d_fwd(x, w, strides, pads, precision):
    return _conv2d(x, w, strides, pads, precision), (x, w)


def _conv2d_bwd(strides, pads, precision, res, dy):
    x, w = res
    kh, kw = w.shape[0], w.shape[1]
    full = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]), (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    if strides == (1, 1) and all(p >= 0 for pair in full for p in pair):
        # The input gradient as an ordinary convolution of dy with the flipped kernel (in and
        # out channels swapped): XLA's own transpose of the convolution runs ~2x slower inside
        # a while-loop body on XLA:CPU (benchmarks/NOTES_cnn.md), this form does not.
        w_t = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
        dx = jax.lax.conv_general_dilated(
            dy, w_t, (1, 1), full, dimension_numbers=_NHWC, precision=precision
        ).astype(x.dtype)
    else:
        _, vjp_x = jax.vjp(
            lambda xx: jax.lax.conv_general_dilated(
                xx, w, strides, pads, dimension_numbers=_NHWC, precision=precision
            ),
            x,
        )
        (dx,) = vjp_x(dy)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out = jax.lax.conv_general_dilated(
        jnp.transpose(xp, (3, 1, 2, 0)),  # [ci, H, W, b]
        jnp.transpose(dy, (1, 2, 0, 3)),  # [h, w, b, co]
        (1, 1),
        "VALID",
        rhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )  # [ci, >= kh, >= kw, co]
    dw = jnp.transpose(out[:, :kh, :kw, :], (1, 2, 0, 3)).astype(w.dtype)
    return dx, dw


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _loop_friendly_conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """Drop-in for ``lax.conv_general_dilated`` (as ``nnx.Conv(conv_general_dilated=...)``):
    plain 2-D NHWC convolutions get the loop-friendly kernel gradient, anything else goes to
    ``lax.conv_general_dilated`` unchanged."""
    plain = (
        lhs.ndim == 4
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and kwargs.get("out_sharding") is None
        and kwargs.get("preferred_element_type") is None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[0:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(p < 0 for pair in pads for p in pair):
        return jax.lax.conv_general_dilated(
            lhs, rhs, strides, pads, dimension_numbers=dimension_numbers, precision=precision
        )
    return _conv2d(lhs, rhs, strides, pads, precision)


def _linear(a: int, b: int, rngs, init: str = "lecun") -> nnx.Linear:
    if init == "torch":
        return nnx.Linear(a, b, kernel_init=_torch_uniform(a), bias_init=_torch_uniform(a),
                          rngs=rngs)
    return nnx.Linear(a, b, kernel_init=_lecun_normal, bias_init=_zeros, rngs=rngs)


def _conv(
    a: int, b: int, kernel, *, kernel_init=_lecun_normal, fast_grad: bool = True,
    init: str = "lecun", **kw
) -> nnx.Conv:
    if fast_grad:
        kw["conv_general_dilated"] = _loop_friendly_conv_general_dilated
    bias_init = _zeros
    if init == "torch":
        kernel_init = bias_init = _torch_uniform(a * math.prod(kernel))
    return nnx.Conv(a, b, kernel, kernel_init=kernel_init, bias_init=bias_init, **kw)


def _batchnorm(c: int, rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        c, momentum=_BN_MOMENTUM, epsilon=_BN_EPS, scale_init=_ones, bias_init=_zeros, rngs=rngs
    )


def _dropout_masks(key, rate: float, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """Inverted-dropout multipliers (0 or ``1 / (1 - rate)``) for several tensors, from ONE draw.

    One ``jax.random.bits`` call for all dropout layers instead of one Bernoulli draw per layer:
    with threefry keys under ``vmap`` this compiles ~10x faster (0.45 s vs 5 s for three layers
    on a 2-core CPU) and gives the same distribution.
    """
    sizes = [math.prod(s) for s in shapes]
    bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
    threshold = np.uint32(min(round((1.0 - rate) * 2.0**32), 2**32 - 1))
    scale = jnp.float32(1.0 / (1.0 - rate))
    masks, offset = [], 0
    for shape, size in zip(shapes, sizes):
        keep = bits[offset : offset + size].reshape(shape) < threshold
        masks.append(jnp.where(keep, scale, jnp.float32(0.0)))
        offset += size
    return masks


def _need_key(name: str, train: bool, key):
    if train and key is None:
        raise ValueError(
            f"model {name!r} uses dropout: apply(..., train=True) needs a PRNG key (key=...)."
        )


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


class LogReg(nnx.Module):
    """Multinomial logistic regression: ``logits = W vec(x) + b``."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int, init: str = "lecun", *,
                 rngs: nnx.Rngs):
        d = int(np.prod(input_shape))
        self.linear = _linear(d, num_outputs, rngs, _check_init("logreg", init))

    def __call__(self, x, *, train: bool = False, key=None):
        return self.linear(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    """Fully connected ReLU network ``d -> hidden[0] -> ... -> num_outputs``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int] = (100,),
        init: str = "lecun",
        *,
        rngs: nnx.Rngs,
    ):
        sizes = [int(np.prod(input_shape)), *[int(h) for h in hidden]]
        if any(h <= 0 for h in sizes[1:]):
            raise ConfigError(f"mlp hidden sizes must be positive, got {tuple(hidden)}")
        init = _check_init("mlp", init)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            setattr(self, f"hidden{i}", _linear(a, b, rngs, init))
        self.n_hidden = len(sizes) - 1
        self.out = _linear(sizes[-1], num_outputs, rngs, init)

    def __call__(self, x, *, train: bool = False, key=None):
        x = x.reshape(x.shape[0], -1)
        for i in range(self.n_hidden):
            x = jax.nn.relu(getattr(self, f"hidden{i}")(x))
        return self.out(x)


class LeNet(nnx.Module):
    """conv5x5(c1)-ReLU-maxpool2-conv5x5(c2)-ReLU-maxpool2-FC (LeCun et al. 1998 style).

    ``padding="auto"`` (default) uses VALID convolutions, the classic LeNet / PyTorch-MNIST layout
    (28 -> 24 -> 12 -> 8 -> 4, FC 1024 -> classes), when the input is at least 16x16, and SAME
    convolutions for smaller inputs such as 8x8 digits (8 -> 4 -> 2, FC 256 -> classes), whose
    feature map would vanish otherwise. SAME on 28x28 costs ~3x the FLOPs of VALID.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (32, 64),
        padding: str = "auto",
        fast_conv_grad: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        h, w, c = _image_shape("lenet", tuple(input_shape))
        if padding == "auto":
            padding = "VALID" if min(h, w) >= 16 else "SAME"
        if padding not in ("SAME", "VALID"):
            raise ConfigError(f"lenet padding must be 'auto', 'SAME' or 'VALID', got {padding!r}")
        c1, c2 = (int(v) for v in channels)
        self.conv1 = _conv(c, c1, (5, 5), padding=padding, fast_grad=fast_conv_grad, rngs=rngs)
        self.conv2 = _conv(c1, c2, (5, 5), padding=padding, fast_grad=fast_conv_grad, rngs=rngs)
        for _ in range(2):
            h, w = _pool_out(_conv_out(h, 5, padding)), _pool_out(_conv_out(w, 5, padding))
        if h < 1 or w < 1:
            raise ConfigError(
                f"lenet with padding {padding!r} cannot take input_shape {tuple(input_shape)}: "
                "the feature map vanishes; use padding='SAME'."
            )
        self.fc = _linear(h * w * c2, num_outputs, rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = _max_pool(jax.nn.relu(self.conv1(x)))
        x = _max_pool(jax.nn.relu(self.conv2(x)))
        return self.fc(x.reshape(x.shape[0], -1))


class DMCNN(nnx.Module):
    """The CNN of El-Mhamdi et al. (2021) (``empire-cnn``).

    conv3x3(64)-ReLU-BN-conv3x3(64)-ReLU-BN-maxpool2-dropout-conv3x3(128)-ReLU-BN-conv3x3(128)-
    ReLU-BN-maxpool2-dropout-FC(hidden)-ReLU-dropout-FC(num_outputs); SAME padding, so a 32x32x3
    input gives the paper's FC(8192 -> 128).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: int | None = None,
        dropout: float = 0.25,
        fast_conv_grad: bool = True,
        init: str = "lecun",
        *,
        rngs: nnx.Rngs,
    ):
        h, w, c = _image_shape("dm_cnn", tuple(input_shape))
        init = _check_init("dm_cnn", init)
        if hidden is None:
            hidden = 128 if num_outputs <= 10 else 256
        chans = [(c, 64), (64, 64), (64, 128), (128, 128)]
        for i, (a, b) in enumerate(chans):
            setattr(
                self,
                f"conv{i}",
                _conv(a, b, (3, 3), padding="SAME", fast_grad=fast_conv_grad, init=init,
                      rngs=rngs),
            )
            setattr(self, f"bn{i}", _batchnorm(b, rngs))
        h, w = _pool_out(_pool_out(h)), _pool_out(_pool_out(w))
        if h < 1 or w < 1:
            raise ConfigError(f"dm_cnn needs inputs of at least 4x4, got {tuple(input_shape)}")
        self.fc1 = _linear(h * w * 128, int(hidden), rngs, init)
        self.fc2 = _linear(int(hidden), num_outputs, rngs, init)
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dm_cnn dropout must be in [0, 1), got {dropout}")
        self.rate = float(dropout)
        h1, w1 = _pool_out(input_shape[0]), _pool_out(input_shape[1])
        self.drop_shapes = ((h1, w1, 64), (h, w, 128), (int(hidden),))

    def __call__(self, x, *, train: bool = False, key=None):
        masks = [None, None, None]
        if train and self.rate > 0:
            _need_key("dm_cnn", train, key)
            b = x.shape[0]
            masks = _dropout_masks(key, self.rate, [(b, *s) for s in self.drop_shapes])
        ura = not train
        for i in range(4):
            x = getattr(self, f"bn{i}")(
                jax.nn.relu(getattr(self, f"conv{i}")(x)), use_running_average=ura
            )
            if i % 2 == 1:
                x = _max_pool(x)
                if masks[i // 2] is not None:
                    x = x * masks[i // 2]
        x = jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1)))
        if masks[2] is not None:
            x = x * masks[2]
        return self.fc2(x)


def _norm(kind: str, channels: int, groups: int, rngs: nnx.Rngs):
    if kind == "batch":
        return _batchnorm(channels, rngs)
    return nnx.GroupNorm(
        channels, num_groups=min(groups, channels), epsilon=_BN_EPS, scale_init=_ones,
        bias_init=_zeros, rngs=rngs,
    )


def _apply_norm(norm, x, train: bool):
    if isinstance(norm, nnx.BatchNorm):
        return norm(x, use_running_average=not train)
    return norm(x)



class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016, Fig. 2)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        norm: str,
        groups: int,
        shortcut: str,
        fast_conv_grad: bool = True,
        *,
        rngs,
    ):
        conv = dict(
            padding="SAME", use_bias=False, kernel_init=_he_normal, fast_grad=fast_conv_grad,
            rngs=rngs,
        )
        self.conv1 = _conv(cin, cout, (3, 3), strides=stride, **conv)
        self.norm1 = _norm(norm, cout, groups, rngs)
        self.conv2 = _conv(cout, cout, (3, 3), strides=1, **conv)
        self.norm2 = _norm(norm, cout, groups, rngs)
        self.stride, self.cin, self.cout = stride, cin, cout
        self.project = shortcut == "B" and (stride != 1 or cin != cout)
        if self.project:
            self.proj = _conv(cin, cout, (1, 1), strides=stride, **conv)
            self.proj_norm = _norm(norm, cout, groups, rngs)

    def __call__(self, x, train: bool):
        y = jax.nn.relu(_apply_norm(self.norm1, self.conv1(x), train))
        y = _apply_norm(self.norm2, self.conv2(y), train)
        if self.project:
            s = _apply_norm(self.proj_norm, self.proj(x), train)
        elif self.stride != 1 or self.cin != self.cout:
            # option A: subsample and zero-pad the channels (parameter-free)
            s = x[:, :: self.stride, :: self.stride, :]
            extra = self.cout - self.cin
            s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        else:
            s = x
        return jax.nn.relu(y + s)


class ResNet20(nnx.Module):
    """CIFAR ResNet-20 (He et al. 2016 §4.2): conv3x3(16), 3 stages x 3 basic blocks, GAP, FC."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        norm: str = "batch",
        groups: int = 8,
        shortcut: str = "A",
        width: int = 16,
        blocks_per_stage: int = 3,
        fast_conv_grad: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        _, _, c = _image_shape("resnet20", tuple(input_shape))
        if norm not in ("batch", "group"):
            raise ConfigError(f"resnet20 norm must be 'batch' or 'group', got {norm!r}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"resnet20 shortcut must be 'A' or 'B', got {shortcut!r}")
        if groups < 1 or width % min(groups, width) != 0:
            raise ConfigError(f"resnet20 groups={groups} must divide the width {width}")
        self.conv = _conv(
            c, width, (3, 3), padding="SAME", use_bias=False, kernel_init=_he_normal,
            fast_grad=fast_conv_grad, rngs=rngs,
        )
        self.norm = _norm(norm, width, groups, rngs)
        cin = width
        self.n_blocks = 0
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks_per_stage):
                stride = 2 if (stage > 0 and b == 0) else 1
                blk = BasicBlock(
                    cin, width * mult, stride, norm, groups, shortcut, fast_conv_grad, rngs=rngs
                )
                setattr(self, f"block{self.n_blocks}", blk)
                self.n_blocks += 1
                cin = width * mult
        self.fc = _linear(cin, num_outputs, rngs)

    def __call__(self, x, *, train: bool = False, key=None):
        x = jax.nn.relu(_apply_norm(self.norm, self.conv(x), train))
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i}")(x, train)
        return self.fc(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@MODELS.register(
    "logreg",
    "Multinomial logistic regression (one linear layer); init 'lecun' or 'torch'.",
    "-",
)
def logreg(input_shape, num_outputs, *, rngs, init: str = "lecun"):
    return LogReg(input_shape, num_outputs, init, rngs=rngs)


@MODELS.register(
    "mlp",
    "Fully connected ReLU network; default hidden=(100,): the 784-100-10 model; init 'lecun' "
    "(LeCun normal, zero biases) or 'torch' (PyTorch's default uniform, as El-Mhamdi et al.).",
    "El-Mhamdi et al. 2021 (simples-full)",
)
def mlp(input_shape, num_outputs, *, rngs, hidden: Sequence[int] = (100,), init: str = "lecun"):
    return MLP(input_shape, num_outputs, tuple(hidden), init, rngs=rngs)


@MODELS.register(
    "lenet",
    "Small CNN: conv5x5(32)-pool-conv5x5(64)-pool-FC; padding 'auto' (VALID if >= 16x16 else "
    "SAME), 'SAME' or 'VALID'.",
    "LeCun et al. 1998",
)
def lenet(
    input_shape,
    num_outputs,
    *,
    rngs,
    channels: Sequence[int] = (32, 64),
    padding: str = "auto",
    fast_conv_grad: bool = True,
):
    return LeNet(input_shape, num_outputs, tuple(channels), padding, fast_conv_grad, rngs=rngs)


@MODELS.register(
    "dm_cnn",
    "The distributed-momentum paper's CNN (4 conv + BN, dropout 0.25, FC 128 / 256 for > 10 "
    "classes); init 'lecun' or 'torch' (PyTorch's default, as the authors' code).",
    "El-Mhamdi, Guerraoui & Rouault 2021 (empire-cnn)",
)
def dm_cnn(
    input_shape,
    num_outputs,
    *,
    rngs,
    hidden: int | None = None,
    dropout: float = 0.25,
    fast_conv_grad: bool = True,
    init: str = "lecun",
):
    return DMCNN(input_shape, num_outputs, hidden, dropout, fast_conv_grad, init, rngs=rngs)


@MODELS.register(
    "resnet20",
    "CIFAR ResNet-20 (16/32/64 channels); norm='batch' or 'group' (GroupNorm, groups=8 default), "
    "shortcut 'A' (zero-pad, paper) or 'B' (1x1 projection).",
    "He et al. 2016; Wu & He 2018",
)
def resnet20(
    input_shape,
    num_outputs,
    *,
    rngs,
    norm: str = "batch",
    groups: int = 8,
    shortcut: str = "A",
    fast_conv_grad: bool = True,
):
    return ResNet20(
        input_shape, num_outputs, norm, groups, shortcut, fast_conv_grad=fast_conv_grad, rngs=rngs
    )


# --------------------------------------------------------------------------------------------
# functional adapter
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
    """A model as pure functions over explicit pytrees, for use inside jit / vmap / scan.

    Attributes:
      name: registry name of the model.
      graphdef: the static NNX graph definition (no arrays).
      params: nested ``dict`` of float32 arrays (trainable). Works with ``jax.tree.*`` and
        ``jax.flatten_util.ravel_pytree``.
      state: nested ``dict`` of non-trainable arrays (BatchNorm running ``mean`` / ``var``);
        ``{}`` when the model has none.
      input_shape: shape of one input (no batch axis).
      num_outputs: size of the output layer.
    """

    name: str
    graphdef: Any
    params: Any
    state: Any
    input_shape: tuple[int, ...] = ()
    num_outputs: int = 0

    def apply(self, params, state, x, *, train: bool, key=None) -> tuple[jax.Array, Any]:
        """Runs the model on a batch.

        Pure: rebuilds the module from ``(graphdef, params, state)`` at trace time, so it is safe
        under ``jit``, ``vmap``, ``grad`` and ``scan``.

        Args:
          params: pytree like ``self.params``.
          state: pytree like ``self.state``.
          x: ``[B, *input_shape]`` float32 (NHWC for images).
          train: ``True`` uses batch statistics (and returns updated running statistics) and
            dropout; ``False`` uses the running statistics and no dropout.
          key: PRNG key for dropout; required when ``train=True`` for models with dropout,
            ignored otherwise. The output is a deterministic function of the key.

        Returns:
          ``(logits, new_state)``: logits ``[B, num_outputs]`` (``[B]`` when ``num_outputs ==
          1``) and the new state (``state`` itself when ``train=False``).
        """
        module = nnx.merge(self.graphdef, params, state)
        out = module(x, train=train, key=key)
        if self.num_outputs == 1:
            out = out[..., 0]
        if train and jax.tree.leaves(state):
            new_state = nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))
        else:
            new_state = state
        return out, new_state

    def predict(self, params, state, x, *, chunk_size: int = 1000) -> jax.Array:
        """Eval-mode outputs for a large ``x`` in chunks (bounds im2col memory for CNNs).

        Args:
          params, state: as in :meth:`apply`.
          x: ``[N, *input_shape]``.
          chunk_size: rows per chunk; the last chunk is padded.

        Returns:
          ``[N, num_outputs]`` (or ``[N]``) outputs of ``apply(..., train=False)``.
        """
        n = x.shape[0]
        if n <= chunk_size:
            return self.apply(params, state, x, train=False)[0]
        n_chunks = -(-n // chunk_size)
        pad = n_chunks * chunk_size - n
        xp = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        xp = xp.reshape(n_chunks, chunk_size, *x.shape[1:])
        out = jax.lax.map(lambda xc: self.apply(params, state, xc, train=False)[0], xp)
        return out.reshape(n_chunks * chunk_size, *out.shape[2:])[:n]

    @property
    def num_params(self) -> int:
        """Number of trainable scalars."""
        return num_params(self.params)

    @property
    def has_state(self) -> bool:
        """Whether the model carries non-trainable state (BatchNorm)."""
        return bool(jax.tree.leaves(self.state))


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays (e.g. ``model.params``), or in a FunctionalModel's
    params."""
    if isinstance(tree, FunctionalModel):
        tree = tree.params
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def build_model(
    name: str, input_shape: tuple[int, ...], num_outputs: int, *, key, **kwargs
) -> FunctionalModel:
    """Builds a registered model and splits it into a :class:`FunctionalModel`.

    Args:
      name: a name in ``MODELS`` (``logreg``, ``mlp``, ``lenet``, ``dm_cnn``, ``resnet20``).
      input_shape: shape of one input without the batch axis, e.g. ``(28, 28, 1)``.
      num_outputs: number of classes (or 1 for scalar regression, giving ``[B]`` outputs).
      key: PRNG key for the initial parameters.
      **kwargs: the model's hyper-parameters (see ``MODELS.entry(name).hyperparameters()``).

    Returns:
      A :class:`FunctionalModel` holding the initial ``params`` and ``state``.

    Raises:
      ConfigError: unknown model, unknown hyper-parameter or unsupported input shape.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if int(num_outputs) < 1:
        raise ConfigError(f"num_outputs must be >= 1, got {num_outputs}")
    if "rngs" in kwargs or "input_shape" in kwargs or "num_outputs" in kwargs:
        raise ConfigError("pass input_shape / num_outputs / key as build_model's own arguments")
    if isinstance(key, int):
        key = jax.random.key(key)
    module = MODELS.build(
        name, input_shape=input_shape, num_outputs=int(num_outputs), rngs=nnx.Rngs(params=key),
        **kwargs,
    )
    graphdef, params, state, rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise RuntimeError(f"model {name!r} holds unexpected variables: {rest}")
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    return FunctionalModel(
        name=name,
        graphdef=graphdef,
        params=params,
        state=state,
        input_shape=input_shape,
        num_outputs=int(num_outputs),
    )


def has_convolutions(model: FunctionalModel) -> bool:
    """Whether the model has convolution kernels (4-D parameters)."""
    return any(np.ndim(leaf) == 4 for leaf in jax.tree.leaves(model.params))


def per_worker_grads(
    model: FunctionalModel, loss_fn: Callable[..., jax.Array], *, method: str = "auto"
) -> Callable[..., tuple[Any, Any]]:
    """Per-worker gradients of a loss, ``[n, B, ...] -> [n, ...]``, with a choice of formulation.

    ``loss_fn(logits, y) -> scalar`` is the mean loss of one worker's batch. The returned function
    ``grads(params, state, x, y, keys) -> (grads, new_states)`` takes ``x: [n, B, *input_shape]``,
    ``y: [n, B]`` and ``keys: [n]`` (dropout keys) and gives per-worker gradient pytrees with a
    leading ``[n]`` axis and per-worker new states (BatchNorm running statistics).

    Methods (measurements in ``benchmarks/NOTES_cnn.md``; lenet on 28x28, 7 workers x 32 images,
    2 CPU cores):

    * ``"vmap"``: ``jax.vmap(jax.grad(...))`` over the worker axis. Best for MLPs and on GPU
      (H100: 1.1 ms per step vs 1.2 ms unrolled). On CPU each worker's conv kernel gradient
      becomes a grouped convolution: 1.6x (Xeon) to 7x (EPYC) slower than ``"unroll"``.
    * ``"unroll"``: a Python loop over the (static) worker count inside the traced function: n
      ordinary convolution gradients in one program. Fastest for CNNs on XLA:CPU; with the
      models' default ``fast_conv_grad=True`` it stays fast inside ``lax.scan`` (409 ms vs
      309 ms per step at top level; 3,061 ms with XLA's own kernel gradient).
    * ``"map"``: ``jax.lax.map`` over workers: one loop body, smallest program; slow for CNNs on
      CPU (a loop inside the loop).
    * ``"auto"`` (default): ``"unroll"`` for models with convolutions on the CPU backend,
      ``"vmap"`` otherwise.

    Args:
      model: the :class:`FunctionalModel`.
      loss_fn: ``(logits, y) -> scalar``.
      method: ``"auto"`` | ``"vmap"`` | ``"unroll"`` | ``"map"``.

    Returns:
      ``grads(params, state, x, y, keys) -> (grads [n, ...], new_state [n, ...])``.
    """
    method = resolve_grad_method(model, method)

    def one(params, state, x, y, key):
        def loss(p):
            logits, new_state = model.apply(p, state, x, train=True, key=key)
            return loss_fn(logits, y), new_state

        return jax.grad(loss, has_aux=True)(params)

    grads = map_workers(one, method)
    grads.method = method  # type: ignore[attr-defined]
    return grads


def resolve_grad_method(model: FunctionalModel, method: str = "auto") -> str:
    """Resolves ``"auto"`` to ``"unroll"`` for conv models on the CPU backend, else ``"vmap"``."""
    if method not in ("auto", "vmap", "unroll", "map"):
        raise ConfigError(
            f"per-worker gradient method must be 'auto', 'vmap', 'unroll' or 'map', got {method!r}"
        )
    if method == "auto":
        cpu = jax.default_backend() == "cpu"
        method = "unroll" if (cpu and has_convolutions(model)) else "vmap"
    return method


def map_workers(fn: Callable[..., Any], method: str, params_axis: int | None = None
                ) -> Callable[..., Any]:
    """Maps ``fn(params, state, x, y, key)`` over a leading worker axis of ``x, y, key``.

    ``state`` is shared; ``params`` too, or per worker (leading axis) with ``params_axis=0``
    (e.g. each worker's Nesterov look-ahead point). ``x`` and ``y`` may be pytrees. ``method`` is
    ``"vmap"``, ``"map"`` (``lax.map``) or ``"unroll"`` (a Python loop over the static worker
    count; see :func:`per_worker_grads`). Returns a function with the same arguments whose
    outputs have a leading worker axis.
    """
    if params_axis not in (None, 0):
        raise ValueError(f"params_axis must be None or 0, got {params_axis!r}")

    def mapped(params, state, x, y, keys):
        if method == "vmap":
            return jax.vmap(fn, in_axes=(params_axis, None, 0, 0, 0))(params, state, x, y, keys)
        if method == "map":
            if params_axis is None:
                return jax.lax.map(lambda a: fn(params, state, *a), (x, y, keys))
            return jax.lax.map(lambda a: fn(a[0], state, *a[1:]), (params, x, y, keys))
        if method != "unroll":
            raise ConfigError(f"unknown per-worker method {method!r}; use 'vmap', 'map' or 'unroll'")
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        n = jax.tree.leaves(x)[0].shape[0]
        outs = [fn(params if params_axis is None else take(params, i), state, take(x, i),
                   take(y, i), keys[i]) for i in range(n)]
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)

    return mapped
