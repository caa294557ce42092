import pytest

from sparseft.sparse.schedules import (
    SparsitySchedule,
    constant_sparsity,
    cubic_sparsity,
    linear_sparsity,
    one_shot_sparsity,
)


def test_cubic_boundaries_and_midpoint():
    # T = 100, dense until step 10, ramp over steps 10..70, final for the last 30
    kwargs = dict(total_steps=100, final_sparsity=0.9, initial_warmup=0.1, final_warmup=0.3)
    assert cubic_sparsity(0, **kwargs) == 0.0
    assert cubic_sparsity(9, **kwargs) == 0.0
    assert cubic_sparsity(10, **kwargs) == 0.0  # s_i = 0 at t0
    # halfway: 0.9 + (0 - 0.9) * (1 - 0.5)^3 = 0.9 * 0.875
    assert cubic_sparsity(40, **kwargs) == pytest.approx(0.7875)
    assert cubic_sparsity(70, **kwargs) == pytest.approx(0.9)
    assert cubic_sparsity(99, **kwargs) == pytest.approx(0.9)


def test_cubic_with_initial_sparsity_and_update_every():
    kwargs = dict(total_steps=100, final_sparsity=0.8, initial_sparsity=0.2, update_every=10)
    assert cubic_sparsity(0, **kwargs) == pytest.approx(0.2)
    # steps 10..19 share the value of step 10: 0.8 - 0.6 * 0.9^3
    assert cubic_sparsity(10, **kwargs) == cubic_sparsity(19, **kwargs) == pytest.approx(0.8 - 0.6 * 0.729)
    assert cubic_sparsity(20, **kwargs) == pytest.approx(0.8 - 0.6 * 0.512)


def test_linear_constant_one_shot():
    assert linear_sparsity(50, 100, 0.6) == pytest.approx(0.3)
    assert linear_sparsity(100, 100, 0.6) == pytest.approx(0.6)
    assert constant_sparsity(0, 100, 0.5) == 0.5
    assert one_shot_sparsity(29, 100, 0.5, initial_warmup=0.3) == 0.0
    assert one_shot_sparsity(30, 100, 0.5, initial_warmup=0.3) == 0.5


def test_schedule_object_dispatches_and_is_monotone():
    schedule = SparsitySchedule(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
    values = [schedule(step, 50, 0.9) for step in range(50)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(0.9)
    assert SparsitySchedule(kind="constant")(0, 50, 0.5) == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="cubic", initial_warmup=0.6, final_warmup=0.4), "leaves no steps"),
        (dict(kind="exponential"), "unknown schedule kind"),
        (dict(initial_warmup=1.0), "initial_warmup"),
        (dict(update_every=0), "update_every"),
        (dict(initial_sparsity=1.0), "sparsity must be in"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(**kwargs)
