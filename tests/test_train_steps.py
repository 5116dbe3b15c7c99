"""The training step, accumulation and the test protocol in plain PyTorch (no Ray)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from stm.config import TrainConfig, embedded_default
from stm.model import build_model
from stm.train.steps import PROTOCOLS, evaluate, lr_factor, train_one_epoch, video_scores

from tiny import TINY, K, L  # tests/tiny.py

CFG = dataclasses.replace(TINY, fusion="residual_mul", temporal="residual_all", time_pool="max")


def batch(n: int, seed: int, t: int = 3, s: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randint(0, 256, (n, t, 3, s, s), generator=g, dtype=torch.uint8),
        "flow": torch.randint(0, 256, (n, t, 2 * L, s, s), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, K, (n,), generator=g),
    }


def one_update(model, batches, accum_steps, lr=1.0, frozen_bn=True):
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # lr 1: the update is minus the gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    stats = train_one_epoch(
        model,
        batches,
        opt,
        sched,
        stage="fused",
        accum_steps=accum_steps,
        device=torch.device("cpu"),
        frozen_bn=frozen_bn,
    )
    return stats


def test_accumulated_micro_batches_equal_one_big_batch():
    torch.manual_seed(0)
    base = build_model(CFG)
    big = batch(8, seed=1)
    micro = [{k: v[i : i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sa = one_update(a, micro, accum_steps=4)
    sb = one_update(b, [big], accum_steps=1)
    assert sa.updates == sb.updates == 1
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), base.parameters()):
        ua, ub = pa - p0, pb - p0  # the two updates (minus the gradients, lr = 1)
        assert ub.norm() > 0, name
        assert (ua - ub).norm() <= 1e-4 * ub.norm(), name


def test_trailing_micro_batches_still_make_a_mean_update():
    torch.manual_seed(0)
    base = build_model(CFG)
    big = batch(6, seed=2)
    micro = [{k: v[i : i + 2] for k, v in big.items()} for i in range(0, 6, 2)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    # accum 2 over 3 micro-batches: one full update, then one of the single trailing batch
    assert one_update(a, micro, accum_steps=2).updates == 2
    assert one_update(b, micro[:2], accum_steps=2).updates == 1


def test_lr_schedule_counts_updates():
    upe = 10
    assert lr_factor(0, upe, (20, 30)) == 1.0
    assert lr_factor(199, upe, (20, 30)) == 1.0
    assert lr_factor(200, upe, (20, 30)) == pytest.approx(0.1)
    assert lr_factor(300, upe, (20, 30)) == pytest.approx(0.01)


def test_video_scores_average_views_and_fuse_streams():
    """Every protocol from one pass: softmax fusion averages probabilities over views and
    streams; logit fusion averages the classification layers' outputs, then the softmax."""
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    b, v, t, h, w = 2, 2, 25, 36, 48  # 25 frames, the full frame and its flip
    rgb, flow = torch.randn(b, v, t, 3, h, w), torch.randn(b, v, t, 2 * L, h, w)
    scores = video_scores(model, rgb, flow, window=3, protocols=PROTOCOLS)
    assert set(scores) == set(PROTOCOLS)
    assert all(set(s) == {"appearance", "motion", "fused"} for s in scores.values())
    for pool, window in (("window", 3), ("global", None)):
        with torch.no_grad():
            per_view = model(rgb.flatten(0, 1), flow.flatten(0, 1), window=window)
        la = per_view.appearance.reshape(b, v, K)
        lm = per_view.motion.reshape(b, v, K)
        soft = scores[(pool, "softmax")]
        app, mot = la.softmax(-1).mean(1), lm.softmax(-1).mean(1)
        torch.testing.assert_close(soft["appearance"], app)
        torch.testing.assert_close(soft["fused"], (app + mot) / 2)
        logit = scores[(pool, "logits")]
        torch.testing.assert_close(logit["motion"], lm.mean(1).softmax(-1))
        torch.testing.assert_close(logit["fused"], ((la.mean(1) + lm.mean(1)) / 2).softmax(-1))
    assert not torch.allclose(
        scores[("window", "logits")]["fused"], scores[("global", "logits")]["fused"]
    )


def test_evaluate_counts_each_video_once():
    model = build_model(CFG)
    batches = []
    for i in range(3):
        x = batch(1, seed=i, t=5)
        batches.append(
            {
                "rgb": x["rgb"][:, None].repeat(1, 2, 1, 1, 1, 1),
                "flow": x["flow"][:, None].repeat(1, 2, 1, 1, 1, 1),
                "label": x["label"],
            }
        )
    confs = evaluate(
        model, batches, stage="fused", num_classes=K, device=torch.device("cpu"),
        window=3, protocols=PROTOCOLS,
    )  # fmt: skip
    assert set(confs) == set(PROTOCOLS)
    for conf in confs.values():
        assert set(conf) == {"appearance", "motion", "fused"}
        assert all(c.sum() == 3 for c in conf.values())
        assert np.array_equal(
            conf["fused"].sum(1), np.bincount([int(b["label"]) for b in batches], minlength=K)
        )


def test_no_weight_decay_on_batchnorm_and_biases():
    from stm.train.loop import param_groups

    model = build_model(CFG)
    decayed, free = param_groups(model, 5e-4)
    assert decayed["weight_decay"] == 5e-4 and free["weight_decay"] == 0.0
    bn = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    }
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert {id(p) for p in free["params"]} == bn | biases
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))
    (one,) = param_groups(model, 5e-4, decay_all=True)
    assert len(one["params"]) == len(list(model.parameters()))


def test_bn_batch_must_divide_the_per_worker_share():
    with pytest.raises(ValueError, match="must divide"):
        TrainConfig(batch_size=128, num_workers=8, bn_batch=3)
    assert TrainConfig(batch_size=128, num_workers=8, bn_batch=4).accum_steps == 4
    cfg = embedded_default()
    assert cfg.accum_steps * cfg.bn_batch * cfg.num_workers == cfg.batch_size
    assert dataclasses.replace(cfg, stage="motion").crop_mode == "multiscale"


def test_trailing_group_update_is_the_mean_of_its_micro_batches():
    """Three micro-batches at accum 2: the second update (one micro-batch) equals that
    micro-batch's own update at accum 1, so its gradient was rescaled to a mean. (BatchNorm on
    batch statistics: the same micro-batches in the same order give the same statistics.)"""
    torch.manual_seed(0)
    base = build_model(CFG)
    micro = [batch(2, seed=10 + i) for i in range(3)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(lr=1e-2, frozen_bn=False)
    assert one_update(a, micro, accum_steps=2, **kw).updates == 2
    one_update(b, micro[:2], accum_steps=2, **kw)
    one_update(b, micro[2:], accum_steps=1, **kw)
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), base.parameters()):
        ua, ub = pa - p0, pb - p0
        assert ub.norm() > 0, name
        assert (ua - ub).norm() <= 1e-4 * ub.norm(), name


class _Logged(torch.nn.Module):
    """A model that logs each forward into ``events``."""

    def __init__(self, model, events):
        super().__init__()
        self.model, self.events = model, events

    def forward(self, rgb, flow):
        self.events.append("forward")
        return self.model(rgb, flow)


def test_micro_batches_stream_one_ahead_not_a_whole_update():
    """The loader is asked for the next micro-batch before the current one runs, and never
    for more: with accum 4 the first forward comes after 2 fetches, not 4."""
    events: list[str] = []

    def loader(n):
        for i in range(n):
            events.append("fetch")
            yield batch(1, seed=i)

    model = _Logged(build_model(CFG), events)
    stats = one_update(model, loader(8), accum_steps=4)
    assert stats.updates == 2 and stats.videos == 8
    ahead = []  # fetches minus forwards when each forward starts
    for i, e in enumerate(events):
        if e == "forward":
            ahead.append(events[:i].count("fetch") - events[:i].count("forward"))
    assert ahead == [2, 2, 2, 2, 2, 2, 2, 1], events


def test_cpu_bf16_autocast_step_with_channels_last():
    """The step under CPU bf16 autocast on a channels-last model: convolutions run in bf16 and
    NHWC, the loss is finite, every trained parameter moves, weights stay channels-last."""
    from stm.model import to_channels_last

    torch.manual_seed(0)
    model = to_channels_last(build_model(CFG))
    before = copy.deepcopy(model)
    seen = []
    conv1 = model.appearance.conv1
    conv1.register_forward_hook(lambda m, i, out: seen.append(out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    stats = train_one_epoch(
        model,
        [batch(2, seed=1), batch(2, seed=2)],
        opt,
        sched,
        stage="fused",
        accum_steps=2,
        device=torch.device("cpu"),
        bf16=True,
    )
    assert np.isfinite(stats.loss) and stats.updates == 1 and stats.videos == 4
    assert seen[0].dtype == torch.bfloat16
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert conv1.weight.dtype == torch.float32  # autocast casts copies; the weights stay fp32
    assert conv1.weight.is_contiguous(memory_format=torch.channels_last)
    moved = [
        name
        for (name, p), p0 in zip(model.named_parameters(), before.parameters())
        if not torch.equal(p, p0)
    ]
    assert len(moved) == len(list(model.parameters()))


def test_bf16_and_channels_last_default_to_cuda_only():
    cfg = TrainConfig()
    assert cfg.use_bf16("cuda") and not cfg.use_bf16("cpu")
    assert cfg.use_channels_last("cuda") and not cfg.use_channels_last("cpu")
    forced = TrainConfig(bf16=True, channels_last=False)
    assert forced.use_bf16("cpu") and not forced.use_channels_last("cuda")


@pytest.mark.parametrize("gpus", [0.5, 0.25])
def test_fractional_gpus_with_several_workers_is_a_config_error(gpus):
    with pytest.raises(ValueError, match="several ranks on one GPU"):
        TrainConfig(num_workers=2, gpus_per_worker=gpus)
    assert TrainConfig(num_workers=1, gpus_per_worker=gpus).gpus_per_worker == gpus
    with pytest.raises(ValueError, match="whole number"):
        TrainConfig(num_workers=2, gpus_per_worker=1.5)


def test_one_readable_log_line_per_epoch():
    from stm.train.loop import epoch_line

    metrics = {
        "epoch": 4.0, "lr": 2e-3, "train_loss": 1.23456, "train_chunks_per_s": 41.25,
        "train_clip_acc_motion": 0.5, "test_video_acc_motion": 0.75,
    }  # fmt: skip
    line = epoch_line(metrics, 16)
    expected = "epoch 4/16  lr 2.0e-03  loss 1.235  train motion 50.0%  test motion 75.0%"
    assert line == expected + "  41.2 chunks/s"
    assert "\n" not in line and "{" not in line
