"""The original's optimisation details: per-parameter gradient clipping and weight decay on the
weight-norm magnitude, by default; the study presets pin the previous rule."""
import pytest
import torch
from torch import nn

from glsd.config import ConfigError, load_config
from glsd.models.heads import build_network
from glsd.train.optim import clip_gradients, param_groups

from helpers_tiny import tiny_config


def _model_with_grads(seed=0):
    """Parameters whose gradients have norms from ~0.05 to ~40 (some below, some above 3)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4))
    scales = [10.0, 0.01, 3.0, 0.5, 1.0, 0.0]
    for p, s in zip(model.parameters(), scales):
        p.grad = torch.randn_like(p) * s
    model[3].bias.grad = None  # a parameter without a gradient is left alone
    return model


def _naive_clip(model, clip):
    """DINO's utils.clip_gradients, one tensor at a time."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


def test_per_param_clipping_matches_the_naive_loop():
    ours, ref = _model_with_grads(), _model_with_grads()
    before = [None if p.grad is None else p.grad.norm().item() for p in ours.parameters()]
    assert max(n for n in before if n is not None) > 3 > min(n for n in before if n is not None)
    total = clip_gradients(ours.parameters(), 3.0, "per_param")
    _naive_clip(ref, 3.0)
    # The returned norm (for the finite check) is the total before clipping, as clip_grad_norm_'s.
    assert total.item() == pytest.approx(torch.tensor([n for n in before if n is not None]).norm().item())
    for a, b in zip(ours.parameters(), ref.parameters()):
        if b.grad is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    after = [p.grad.norm().item() for p in ours.parameters() if p.grad is not None]
    assert max(after) <= 3.0 + 1e-5
    # Tensors under the limit keep their gradient exactly.
    small = [(p, n) for p, n in zip(ours.parameters(), before) if n is not None and n < 3.0]
    assert small and all(p.grad.norm().item() == pytest.approx(n) for p, n in small)


def test_global_clipping_is_clip_grad_norm():
    ours, ref = _model_with_grads(1), _model_with_grads(1)
    total = clip_gradients(ours.parameters(), 3.0, "global")
    assert total.item() == pytest.approx(torch.nn.utils.clip_grad_norm_(ref.parameters(), 3.0).item())
    for a, b in zip(ours.parameters(), ref.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad)
    # One norm for all: the per-tensor ratios are kept.
    total = torch.stack([p.grad.norm() for p in ours.parameters() if p.grad is not None]).norm()
    assert total.item() == pytest.approx(3.0, rel=1e-4)


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_weightnorm_magnitude_is_decayed_by_default(tmp_path):
    cfg = tiny_config(tmp_path, "model.norm_last_layer=false")
    assert cfg.train.decay_weightnorm_magnitude is True
    net = build_network(cfg)
    decay, no_decay = _group_names(net, param_groups(net, cfg.train.decay_weightnorm_magnitude))
    magnitudes = {n for n, _ in net.named_parameters() if n.endswith(".original0")}
    assert magnitudes and magnitudes <= decay  # (out_dim, 1): 2-D, decayed as DINO does
    assert all(dict(net.named_parameters())[n].ndim == 1 for n in no_decay)
    assert any(n.endswith(".bias") for n in no_decay)
    decay_old, no_decay_old = _group_names(net, param_groups(net, decay_magnitude=False))
    assert magnitudes <= no_decay_old and not magnitudes & decay_old


@pytest.mark.parametrize("value", [True, False])
def test_the_optimiser_of_a_run_follows_its_magnitude_decay_setting(tmp_path, value):
    """build_optimisation (what a run uses) passes train.decay_weightnorm_magnitude on:
    cpu-default pins false, the other presets keep DINO's decay."""
    from glsd.models.heads import build_teacher
    from glsd.train.optim import build_optimisation

    cfg = tiny_config(tmp_path, "model.norm_last_layer=false",
                      f"train.decay_weightnorm_magnitude={str(value).lower()}")
    student = build_network(cfg)
    opt = build_optimisation(cfg, student, build_teacher(cfg, student), torch.device("cpu"))
    decay, no_decay = _group_names(opt.student, opt.optimizer.param_groups)
    magnitudes = {n for n, _ in opt.student.named_parameters() if n.endswith(".original0")}
    assert magnitudes and magnitudes <= (decay if value else no_decay)
    assert opt.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_frozen_magnitude_is_in_no_group(tmp_path):
    net = build_network(tiny_config(tmp_path, "model.norm_last_layer=true"))
    names = set().union(*_group_names(net, param_groups(net)))
    assert not any(n.endswith(".original0") for n in names)


def test_defaults_and_presets():
    default = load_config(None, [])
    assert default.train.clip_grad_mode == "per_param" and default.train.decay_weightnorm_magnitude
    for name in ("imagenet-swin-t", "cifar10-lowdata-cpu", "cifar10-lowdata-gpu"):
        cfg = load_config(name)  # the paper preset and the sweep: the original's rule
        assert cfg.train.clip_grad_mode == "per_param" and cfg.train.decay_weightnorm_magnitude, name
    bench = load_config("cpu-default")  # pinned: its committed bench and head check used it
    assert bench.train.clip_grad_mode == "global" and not bench.train.decay_weightnorm_magnitude
    with pytest.raises(ConfigError, match="clip_grad_mode"):
        load_config(None, ["train.clip_grad_mode=layerwise"])


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_training_step_clips_by_the_configured_rule(tmp_path, monkeypatch, mode):
    import glsd.train.pretrain as pretrain_mod

    calls = []
    real = pretrain_mod.clip_gradients

    def spy(params, max_norm, clip_mode="per_param"):
        calls.append((max_norm, clip_mode))
        return real(params, max_norm, clip_mode)

    monkeypatch.setattr(pretrain_mod, "clip_gradients", spy)
    pretrain_mod.pretrain(tiny_config(tmp_path / mode, f"train.clip_grad_mode={mode}",
                                      "train.clip_grad=2.5", "train.max_steps=1"))
    assert calls == [(2.5, mode)]
