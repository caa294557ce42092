import pytest

from sparseft.sparse.schedules import SparsitySchedule, cubic_ramp, ramp_progress


def test_cubic_boundaries_and_midpoint():
    # T = 100, dense until step 10, ramp over steps 10..70, final for the last 30
    schedule = SparsitySchedule(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
    assert schedule(0, 100, 0.9) == 0.0
    assert schedule(9, 100, 0.9) == 0.0
    assert schedule(10, 100, 0.9) == 0.0  # s_i = 0 at t0
    # halfway: 0.9 + (0 - 0.9) * (1 - 0.5)^3 = 0.9 * 0.875
    assert schedule(40, 100, 0.9) == pytest.approx(0.7875)
    assert schedule(70, 100, 0.9) == 0.9
    assert schedule(99, 100, 0.9) == 0.9


def test_cubic_with_initial_sparsity_and_update_every():
    schedule = SparsitySchedule(initial_sparsity=0.2, initial_warmup=0.0, final_warmup=0.0, update_every=10)
    assert schedule(0, 100, 0.8) == pytest.approx(0.2)
    # steps 10..19 share the value of step 10: 0.8 - 0.6 * 0.9^3
    assert schedule(10, 100, 0.8) == schedule(19, 100, 0.8) == pytest.approx(0.8 - 0.6 * 0.729)
    assert schedule(20, 100, 0.8) == pytest.approx(0.8 - 0.6 * 0.512)


def test_linear_constant_one_shot():
    linear = SparsitySchedule(kind="linear", initial_warmup=0.0, final_warmup=0.0)
    assert linear(50, 100, 0.6) == pytest.approx(0.3)
    assert linear(100, 100, 0.6) == 0.6
    assert SparsitySchedule(kind="constant")(0, 100, 0.5) == 0.5
    one_shot = SparsitySchedule(kind="one_shot", initial_warmup=0.3)
    assert one_shot(29, 100, 0.5) == 0.0
    assert one_shot(30, 100, 0.5) == 0.5


def test_warmups_in_steps_and_in_lr_warmups_match_the_movement_scripts():
    # emmental: t_i = initial_warmup * W, t_f = final_warmup * W, W = LR warm-up steps
    by_lr = SparsitySchedule(initial_warmup=1, final_warmup=2, warmup_unit="lr_warmup")
    by_steps = SparsitySchedule(initial_warmup=100, final_warmup=200, warmup_unit="steps")
    assert by_lr.window(1000, lr_warmup_steps=100) == by_steps.window(1000) == (100, 800)
    # the threshold (fraction kept) 1 -> 0.1 over 100..800: thr = 0.1 + 0.9 * (1 - 350/700)^3
    assert 1 - by_lr(450, 1000, 0.9, lr_warmup_steps=100) == pytest.approx(0.1 + 0.9 * 0.125)


def pst_reference_sparsity(step, total, initial_warmup=0.1, final_warmup=0.3, initial=0.0, final=0.9):
    """PST's ``schedule_sparsity_ratio`` (AliceMind), transcribed: no rounding of the step."""
    if step <= initial_warmup * total:
        return initial
    if step > total - final_warmup * total:
        return final
    coeff = 1 - (step - initial_warmup * total) / (total - (final_warmup + initial_warmup) * total)
    return final + (initial - final) * coeff**3


def test_ramp_starting_between_steps_is_not_a_step_late():
    # T = 25: the ramp starts at 2.5, so step 3 is half a step into it (it was 0 when the step was floored)
    schedule = SparsitySchedule(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
    assert schedule(3, 25, 0.9) == pytest.approx(0.9 * (1 - (1 - 0.5 / 15) ** 3))
    assert schedule(3, 25, 0.9) == pytest.approx(0.0870, abs=1e-4)


@pytest.mark.parametrize("total", [25, 33, 47, 101, 1001, 1234, 2999])
def test_cubic_schedule_matches_the_pst_reference_at_every_step(total):
    schedule = SparsitySchedule(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
    for step in range(total - 1):  # the last step is forced to the final value by the strategy
        assert schedule(step, total, 0.9) == pytest.approx(pst_reference_sparsity(step, total), rel=1e-12, abs=1e-15)


def test_initial_sparsity_holds_during_the_initial_warmup_as_in_the_pst_reference():
    # the example: schedule_sparsity_ratio(0, 25, 0.1, 0.3, 0.2, 0.5) is 0.2 (it was 0.0 here)
    schedule = SparsitySchedule(kind="cubic", initial_sparsity=0.2, initial_warmup=0.1, final_warmup=0.3)
    assert schedule(0, 25, 0.5) == pytest.approx(0.2)
    for step in range(24):
        assert schedule(step, 25, 0.5) == pytest.approx(pst_reference_sparsity(step, 25, initial=0.2, final=0.5))
    assert SparsitySchedule(kind="one_shot", initial_warmup=0.3)(0, 25, 0.5) == 0.0  # no ramp: dense first


def test_update_every_counts_whole_steps_from_the_first_step_of_the_ramp():
    # ramp from 2.5 to 12.5: updates at steps 3, 7, 11 (ceil(2.5) + 4k)
    assert ramp_progress(6, 2.5, 12.5, update_every=4) == ramp_progress(3, 2.5, 12.5) == pytest.approx(0.05)
    assert ramp_progress(7, 2.5, 12.5, update_every=4) == pytest.approx(0.45)
    assert ramp_progress(2, 2.5, 12.5, update_every=4) is None


def test_schedule_with_no_room_to_prune_is_an_error():
    # the reference silently never pruned here and evaluated with the final mask
    schedule = SparsitySchedule(initial_warmup=1, final_warmup=2, warmup_unit="lr_warmup")
    with pytest.raises(ValueError, match="has no steps to prune in: initial warm-up ends at step 500"):
        schedule(0, 1200, 0.9, lr_warmup_steps=500)


def test_pure_ramps():
    assert ramp_progress(5, 10, 20) is None
    assert ramp_progress(15, 10, 20) == 0.5
    assert ramp_progress(19, 10, 20, update_every=4) == pytest.approx(0.8)
    assert cubic_ramp(0.5) == 0.875 and cubic_ramp(1.0) == 1.0


def test_schedule_is_monotone_and_ends_at_final():
    schedule = SparsitySchedule(kind="cubic", initial_warmup=0.1, final_warmup=0.3)
    values = [schedule(step, 50, 0.9) for step in range(50)]
    assert values == sorted(values)
    assert values[-1] == 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="cubic", initial_warmup=0.6, final_warmup=0.4), "leaves no steps"),
        (dict(kind="exponential"), "unknown schedule kind"),
        (dict(initial_warmup=1.0), "initial_warmup"),
        (dict(final_warmup=-1, warmup_unit="steps"), "final_warmup must be >= 0"),
        (dict(warmup_unit="epochs"), "unknown warmup_unit"),
        (dict(update_every=0), "update_every"),
        (dict(initial_sparsity=1.0), "sparsity must be in"),
    ],
)
def test_schedule_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparsitySchedule(**kwargs)
