"""Per-step schedules (glsd.train.schedules) and the optimiser-side rules that use them
(glsd.train.optim.ema_update, apply_schedule), against hand-computed values.

The run below: 2 epochs of 5 steps (10 steps), 3 warm-up steps. The lr's cosine then spans
7 steps, t = k/6, so its middle (k=3, step 6) has cos(pi/2) = 0; the others span all 10
steps, t = k/9, where k=3 and k=6 give cos = +-1/2.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from glsd.config import load_config
from glsd.train.optim import apply_schedule, ema_update, param_groups
from glsd.train.schedules import Schedules, cosine, teacher_temperature, warmup_steps


def _cfg(*overrides):
    return load_config(None, ["train.epochs=2", "train.lr=0.1", "train.min_lr=0.02",
                              "train.warmup_steps=3", "train.weight_decay=0.04",
                              "train.weight_decay_end=0.4", "train.momentum_teacher=0.996",
                              "train.momentum_teacher_end=1.0", "loss.warmup_teacher_temp=0.04",
                              "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_epochs=0.8",
                              *overrides])


def test_lr_warms_up_linearly_from_zero_then_follows_the_cosine_to_min_lr():
    s = Schedules(_cfg(), steps_per_epoch=5, global_batch=512)
    # peak = 0.1 * 512 / 256 = 0.2; warm-up excludes its end (step 3 is the peak).
    expected = {0: 0.0, 1: 0.2 / 3, 2: 0.4 / 3, 3: 0.2, 6: (0.2 + 0.02) / 2, 9: 0.02}
    assert len(s.lr) == s.total_steps == 10 and s.warmup_steps == 3
    assert {k: s.lr[k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_weight_decay_and_teacher_momentum_follow_cosines_over_the_whole_run():
    s = Schedules(_cfg(), steps_per_epoch=5, global_batch=256)
    # end + (start - end) * (1 + cos(pi k / 9)) / 2 at k = 0, 3, 6, 9: weights 1, 3/4, 1/4, 0.
    assert list(s.wd[[0, 3, 6, 9]]) == pytest.approx([0.04, 0.13, 0.31, 0.4], abs=1e-12)
    assert list(s.momentum[[0, 3, 6, 9]]) == pytest.approx([0.996, 0.997, 0.999, 1.0], abs=1e-12)


def test_teacher_temperature_reaches_its_value_at_the_last_warmup_step():
    s = Schedules(_cfg(), steps_per_epoch=5, global_batch=256)
    # int(0.8 * 5) = 4 warm-up steps, endpoint included (unlike the lr).
    assert list(s.teacher_temp) == pytest.approx([0.04, 0.05, 0.06] + [0.07] * 7, abs=1e-12)
    assert list(teacher_temperature(0.01, 0.05, 20, 3)) == pytest.approx([0.01, 0.03, 0.05])


def test_warmup_and_freeze_steps_come_from_steps_else_epochs():
    by_epochs = _cfg("train.warmup_steps=null", "train.warmup_epochs=1.5", "train.freeze_last_layer_epochs=0.5")
    assert warmup_steps(by_epochs, 4) == 6  # 1.5 * 4
    assert Schedules(by_epochs, 4, 256).freeze_last_layer_steps == 2  # 0.5 * 4
    by_steps = _cfg("train.warmup_epochs=1.5", "train.freeze_last_layer_steps=7")
    assert warmup_steps(by_steps, 4) == 3
    assert Schedules(by_steps, 4, 256).freeze_last_layer_steps == 7


def test_warmup_longer_than_the_run_is_cut_and_never_reaches_the_peak():
    lr = cosine(1.0, 0.0, total_steps=4, warmup_steps=10)
    assert list(lr) == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert list(cosine(2.0, 1.0, total_steps=1)) == [2.0]  # one step: the start value


def test_ema_update_is_the_convex_combination_with_momentum():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
    ema_update(teacher, student, momentum=0.75)
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.allclose(t, torch.full_like(t, 0.75 * 1.0 + 0.25 * 3.0))  # 1.5
        assert torch.equal(s, torch.full_like(s, 3.0))  # the student is read only


def test_apply_schedule_sets_lr_everywhere_and_weight_decay_on_the_decayed_group_only():
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(param_groups(model), lr=0.0)
    sched = SimpleNamespace(lr=[0.1, 0.2], wd=[0.3, 0.4])
    apply_schedule(opt, sched, 1)
    decayed, exempt = opt.param_groups
    assert decayed["params"][0] is model.weight and exempt["params"][0] is model.bias
    assert (decayed["lr"], exempt["lr"]) == (0.2, 0.2)
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.4, 0.0)  # biases never decay
