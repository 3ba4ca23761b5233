"""Step decay (ByzFL's MultiStepLR) and the schedules module: values, tracing, validation, a run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbyz.config import RunConfig
from jbyz.schedules import step_decay_schedule
from jbyz.validation import validate

BASE = dict(dataset="synthetic_classification", model="logreg", n_workers=4, batch_size=10,
            steps=12, lr=0.5)


def multistep_lr(lr0, milestones, gamma, steps):
    """PyTorch's MultiStepLR stepped once per training step, written as its recursion: the rate
    used at step t, multiplied by gamma when the step counter reaches a milestone."""
    lr, out = lr0, []
    for t in range(steps):
        if t in milestones:
            lr *= gamma
        out.append(lr)
    return out


@pytest.mark.parametrize("milestones,gamma", [([3, 7], 0.1), ([1], 0.5), ([], 0.1), ([5, 6, 9], 0.3)])
def test_step_decay_equals_multistep_lr(milestones, gamma):
    s = step_decay_schedule(0.2, milestones, gamma)
    got = [float(s(t)) for t in range(12)]
    np.testing.assert_allclose(got, multistep_lr(0.2, milestones, gamma, 12), rtol=1e-6)


def test_step_decay_takes_a_traced_rate():
    f = jax.jit(lambda lr, t: step_decay_schedule(lr, [2, 4], 0.5)(t))
    assert [float(f(jnp.float32(0.8), t)) for t in (0, 2, 5)] == pytest.approx([0.8, 0.4, 0.2])


def test_step_schedule_from_a_config_drives_the_run():
    from jbyz.simulate import get_program, run

    cfg = RunConfig(**BASE, lr_schedule="step", lr_schedule_kwargs={"milestones": [4, 8], "factor": 0.1})
    assert validate(cfg) == []
    s = get_program(cfg).lr_schedule(0.5)
    assert [float(s(t)) for t in (0, 4, 8)] == pytest.approx([0.5, 0.05, 0.005])
    # a factor of ~0 at step 1 freezes the model after one update: the loss stops moving
    frozen = run(RunConfig(**{**BASE, "steps": 6, "eval_every": 1}, lr_schedule="step",
                           lr_schedule_kwargs={"milestones": [1], "factor": 1e-12}), progress=False)
    moving = run(RunConfig(**{**BASE, "steps": 6, "eval_every": 1}), progress=False)
    acc_f = [h["test_loss"] for h in frozen.history]
    acc_m = [h["test_loss"] for h in moving.history]
    assert max(acc_f[1:]) - min(acc_f[1:]) < 1e-6
    assert max(acc_m[1:]) - min(acc_m[1:]) > 1e-4


@pytest.mark.parametrize("kwargs,message", [
    ({"milestones": [5, 3]}, "milestones must be strictly increasing, got [5, 3]"),
    ({"milestones": [0]}, "milestones must be a list of step counts >= 1"),
    ({"milestones": 5}, "milestones must be a list of step counts >= 1 (e.g. [1000, 1500]), got 5"),
    ({"milestones": [2], "factor": 0}, "factor must be a number > 0"),
    ({"gamma": 0.1}, "lr_schedule_kwargs ['gamma'] not understood by lr_schedule='step'; valid: "
                     "['factor', 'milestones']"),
])
def test_step_schedule_errors_say_what_is_valid(kwargs, message):
    errs = validate(RunConfig(**BASE, lr_schedule="step", lr_schedule_kwargs=kwargs))
    assert any(message in e for e in errs), errs
