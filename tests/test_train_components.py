"""The training loop's components: loss registry, logit scale, non-finite guard, throughput meter, hooks,
checkpoint manager, validator schedule."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bmclip.data.sources import SyntheticSource
from bmclip.errors import CheckpointError, ConfigError
from bmclip.model import create_model
from bmclip.train import checkpoint as C
from bmclip.train import losses as L
from bmclip.train.config import load_config
from bmclip.train.distributed import DistInfo
from bmclip.train.guard import NonFiniteGuard, NonFiniteLossError
from bmclip.train.hooks import FaultInjector, Hooks
from bmclip.train.metrics import ThroughputMeter, read_jsonl
from bmclip.train.optim import CosineSchedule, build_optimizer
from bmclip.train.trainer import _build_model, train
from bmclip.train.validation import Validator

# ------------------------------------------------------------------------------------------- loss registry


def _features(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_siglip_entry_gives_a_model_starting_at_scale_10_and_bias_minus_10():
    model = _build_model(load_config("tiny-cpu", ["--loss.kind=siglip"]), torch.device("cpu"))
    assert model.config.init_logit_scale == pytest.approx(math.log(10.0))
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_bias.item() == -10.0
    clip = _build_model(load_config("tiny-cpu", ["--loss.kind=clip"]), torch.device("cpu"))
    assert clip.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    assert clip.logit_bias is None and clip.config.init_logit_bias is None


def test_unknown_loss_name_is_a_config_error_listing_the_registered_names():
    with pytest.raises(ConfigError, match=r"loss\.kind: unknown loss 'infonce'; registered losses: clip, siglip"):
        load_config("tiny-cpu", ["--loss.kind=infonce"])
    with pytest.raises(ValueError, match="already registered"):
        L.register_loss(L.get_loss("clip"))


def test_registered_losses_match_a_float64_reference():
    img, txt = _features()
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    logits = s * img @ txt.T
    labels = torch.arange(len(img))
    ref_clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    sign = 2 * torch.eye(len(img), dtype=torch.float64) - 1
    ref_siglip = -F.logsigmoid(sign * (logits + b)).sum() / len(img)
    clip = L.get_loss("clip").build(backend="torch")
    siglip = L.get_loss("siglip").build(backend="torch")
    torch.testing.assert_close(clip(img, txt, s, None), ref_clip, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(siglip(img, txt, s, b), ref_siglip, rtol=1e-10, atol=1e-12)


def test_a_registered_variant_is_reachable_from_the_config_and_trains(tmp_path, monkeypatch):
    # a new loss variant is one registry entry: the config accepts its name, the model starts at its scale/bias,
    # and the training loop calls the loss it builds
    calls = []

    def factory(*, rank, world_size, backend):
        inner = L.get_loss("siglip").build(rank=rank, world_size=world_size, backend=backend)
        return lambda img, txt, scale, bias: calls.append(bias is not None) or inner(img, txt, scale, bias)

    entry = L.LossEntry("siglip-warm", "SigLIP from scale 20, bias -5", factory, math.log(20.0), -5.0)
    monkeypatch.setitem(L.LOSSES, entry.name, entry)
    cfg = load_config("tiny-cpu", [f"--out_dir={tmp_path}", "--progress=false", "--loss.kind=siglip-warm",
                                   "--steps=2", "--log_every=1", "--data.batch_size=16",
                                   "--data.val_max_samples=32", "--ckpt_every=0", "--num_threads=1"])
    model = _build_model(cfg, torch.device("cpu"))
    assert model.logit_scale.exp().item() == pytest.approx(20.0) and model.logit_bias.item() == -5.0
    train(cfg)
    assert calls == [True, True]
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[0]["logit_scale"] == pytest.approx(20.0, rel=0.05)
    assert rows[0]["logit_bias"] == pytest.approx(-5.0, abs=0.1)


def test_logit_scale_clamp_and_readout():
    m = create_model("tiny", init_logit_bias=-2.0)
    ls = L.LogitScale(max_scale=50.0)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    ls.clamp_(m)
    assert m.logit_scale.item() == pytest.approx(math.log(50.0))
    with torch.no_grad():
        m.logit_scale.fill_(-1.0)
    ls.clamp_(m)
    assert m.logit_scale.item() == 0.0
    assert ls.readout(m) == {"logit_scale": 1.0, "logit_bias": -2.0}
    assert set(ls.readout(create_model("tiny"))) == {"logit_scale"}
    with pytest.raises(ConfigError, match="max_logit_scale"):
        L.LogitScale(0.0)


# ----------------------------------------------------------------------------------------- non-finite guard


def _net_with_grads(scale=1.0):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    (net(torch.randn(5, 4)).sum() * scale).backward()
    return net


def test_guard_skips_a_non_finite_step_counts_it_and_stops_after_max_in_a_row():
    skips = []
    guard = NonFiniteGuard(DistInfo(), max_in_a_row=2, grad_clip=0.0, skipped=5, on_skip=skips.append,
                           hint="; see the checkpoints")
    net = _net_with_grads()
    ref_norm = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
    assert guard.check(1, 0.7, net.parameters()) is True
    assert guard.grad_norm == pytest.approx(ref_norm) and guard.skipped == 5 and not skips
    assert guard.check(2, float("nan"), net.parameters()) is False
    assert guard.skipped == 6 and math.isnan(guard.grad_norm)
    assert skips == [{"step": 2, "kind": "skip", "reason": "non-finite loss or grad norm", "loss": skips[0]["loss"],
                      "nonfinite_skipped": 6}] and math.isnan(skips[0]["loss"])
    assert guard.check(3, 0.5, net.parameters()) is True  # a good step resets the run of skips
    net.weight.grad[0, 0] = float("inf")  # finite loss, infinite gradient
    assert guard.check(4, 0.5, net.parameters()) is False
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite losses in a row \(step 5\).*; see the checkpoints"):
        guard.check(5, float("inf"), net.parameters())
    assert guard.skipped == 8


def test_guard_clips_the_gradients_to_grad_clip():
    net = _net_with_grads(scale=100.0)
    before = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
    guard = NonFiniteGuard(DistInfo(), max_in_a_row=1, grad_clip=1.0)
    assert guard.check(1, 1.0, net.parameters())
    after = float(torch.cat([p.grad.flatten() for p in net.parameters()]).norm())
    assert guard.grad_norm == pytest.approx(before) and before > 10 and after == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------- throughput meter


def test_meter_mfu_against_a_hand_computed_value():
    # Vision: 16 px, patch 8 -> 4 patches + CLS = 5 tokens, width 8, MLP 16, 1 layer; text width 8, MLP 16,
    # 1 layer, linear projection; embedding 4. Per image: patch embedding 2*4*(3*64)*8 = 12288, layer
    # 8*5*64 + 4*25*8 + 4*5*8*16 = 5920, projection 2*8*4 = 64 -> 18272. Per caption of c tokens:
    # 8*c*64 + 4*c^2*8 + 4*c*8*16 + 64 = 1024*c + 32*c^2 + 64: 3424 (c=3) + 5984 (c=5) = 9408.
    # Logits: 2 rows x 4 global columns x 2*4 = 64. Forward 36544 + 9408 + 64 = 46016; training 3x = 138048.
    mcfg = SimpleNamespace(embed_dim=4,
                           vision=SimpleNamespace(image_size=16, patch_size=8, width=8, layers=1, mlp_dim=16),
                           text=SimpleNamespace(width=8, layers=1, mlp_dim=16, proj_hidden=0))
    t = [0.0]
    meter = ThroughputMeter(mcfg, global_batch=4, world_size=2, peak_tflops=1e-9, clock=lambda: t[0])
    meter.add_data_wait(0.5)
    meter.add_step([3, 5])
    meter.add_loss(2.0)
    meter.add_loss(4.0)
    t[0] = 4.0
    with meter.paused():  # e.g. validation: 3 s that are not training time
        t[0] = 7.0
    t[0] = 10.0
    assert meter.mean_loss == 3.0
    r = meter.read()  # 7 s of training
    assert r["tflops_per_gpu"] == pytest.approx(138048 / 7 / 1e12, rel=1e-12)
    assert r["mfu"] == pytest.approx(138048 / 7 / 1000, rel=1e-12)  # peak 1e-9 TFLOP/s = 1000 FLOP/s
    assert r["samples_per_s"] == pytest.approx(4 / 7) and r["samples_per_s_per_gpu"] == pytest.approx(2 / 7)
    assert r["data_wait_frac"] == pytest.approx(0.5 / 7)
    t[0] = 12.0  # a new window: nothing counted yet
    assert meter.mean_loss is None and meter.read()["tflops_per_gpu"] == 0.0
    assert (meter.total_s, meter.total_samples) == (9.0, 4)  # both windows' training time, the pause left out
    assert ThroughputMeter(mcfg, global_batch=4).read()["mfu"] is None  # unknown peak: no MFU


# ------------------------------------------------------------------------------------------------- hooks


def test_hooks_run_in_order_and_fault_injection_turns_the_chosen_steps_loss_into_nan():
    hooks = Hooks()
    seen = []
    hooks.add("step_end", lambda step: seen.append(("a", step)))
    hooks.add("step_end", lambda step: seen.append(("b", step)))
    hooks.fire("step_end", step=3)
    assert seen == [("a", 3), ("b", 3)]
    with pytest.raises(ValueError, match="unknown hook point 'after_everything'"):
        hooks.add("after_everything", print)
    fault = load_config("tiny-cpu", ["--fault.nan_at_steps=[2]"]).fault
    FaultInjector(fault, "/nonexistent", rank=0).install(hooks)
    one = torch.tensor(1.5)
    assert hooks.filter("loss", one, step=1) is one
    assert torch.isnan(hooks.filter("loss", one, step=2))
    # nothing set: nothing attached
    quiet = FaultInjector(load_config("tiny-cpu").fault, "/nonexistent").install(Hooks())
    assert all(not fns for fns in quiet._at.values())


# ------------------------------------------------------------------------------------- checkpoint manager


def _state(seed=0):
    torch.manual_seed(seed)
    m = create_model("tiny")
    opt = build_optimizer(m, load_config("tiny-cpu").optim, "cpu")
    sched = CosineSchedule(opt, base_lr=1e-3, warmup_steps=2, total_steps=10)
    src = SyntheticSource(size=64, global_batch=16, image_size=64, context_length=64, seed=0)
    return m, opt, sched, src


def test_checkpoint_manager_saves_restores_and_prunes(tmp_path):
    m, opt, sched, src = _state()
    mgr = C.CheckpointManager(tmp_path, DistInfo(), keep_last=2, every=2, train_config={"seed": 0})
    assert [mgr.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True] and mgr.due(3, force=True)
    assert mgr.find_resume("auto") is None and mgr.find_resume("none") is None
    for step in (1, 2, 3):
        next(src)
        sched.set_step(step)
        mgr.save(step, m, opt, sched, src, counters={"nonfinite_skipped": step, "samples": 16 * step})
    assert [s for s, _ in C.list_checkpoints(tmp_path / "checkpoints")] == [2, 3]  # pruned to keep_last
    assert mgr.last_saved == 3 and mgr.find_resume("auto").name == "step_00000003"
    assert mgr.find_resume(str(tmp_path)) == mgr.find_resume("auto")
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        mgr.find_resume(str(tmp_path / "nothing-here"))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    batch_after = next(src)["input_ids"]

    m2, opt2, sched2, src2 = _state(seed=1)
    fresh = C.CheckpointManager(tmp_path, DistInfo(), keep_last=2)
    where = fresh.find_resume("auto")
    step, counters, same_world = fresh.restore(fresh.load(where), where, m2, opt2, sched2, src2)
    assert (step, counters, same_world) == (3, {"nonfinite_skipped": 3, "samples": 48}, True)
    assert fresh.last_saved == 3 and sched2.state_dict() == sched.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in m2.state_dict().items())
    assert torch.equal(next(src2)["input_ids"], batch_after)  # the data continues where it stopped

    aside = fresh.set_aside("20260101T000000")
    assert aside.name == "checkpoints.replaced-20260101T000000" and not (tmp_path / "checkpoints").exists()
    assert fresh.set_aside("again") is None


def test_checkpoint_manager_restore_with_data_that_does_not_fit_is_a_config_error(tmp_path):
    m, opt, sched, src = _state()
    mgr = C.CheckpointManager(tmp_path, DistInfo())
    mgr.save(1, m, opt, sched, src)
    other = SyntheticSource(size=32, global_batch=8, image_size=64, context_length=64, seed=5)
    st = mgr.load(mgr.find_resume("auto"))
    with pytest.raises(ConfigError, match=r"resume from ckpt: its data-loader position does not fit"):
        mgr.restore(st, "ckpt", m, opt, sched, other)


# ---------------------------------------------------------------------------------------------- validator


def test_validator_schedule():
    cfg = load_config("tiny-cpu", ["--steps=10", "--val_every=4"])
    mcfg = create_model("tiny").config
    v = Validator(cfg, DistInfo(), mcfg, None)
    assert [s for s in range(1, 11) if v.due(s, final=s == 10, stopped_by_signal=False)] == [4, 8, 10]
    assert not v.due(8, final=True, stopped_by_signal=True)  # a signal stop skips validation
    assert v.due(10, final=True, stopped_by_signal=True)  # ... unless the run is complete anyway
    off = Validator(load_config("tiny-cpu", ["--data.synthetic=false"]), DistInfo(), mcfg, None)
    assert not off.due(10, final=True, stopped_by_signal=False)  # nothing to validate on
