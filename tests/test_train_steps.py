"""The training step, accumulation and the test protocol in plain PyTorch (no Ray)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from stm.config import ModelConfig, TrainConfig, embedded_default
from stm.model import build_model
from stm.train.steps import evaluate, lr_factor, train_one_epoch, video_scores

K, L = 4, 2
CFG = ModelConfig(
    num_classes=K,
    appearance_arch="resnet18",
    motion_arch="resnet18",
    flow_length=L,
    fusion="residual_mul",
    temporal="residual_all",
    time_pool="max",
    motion_dropout=0.0,
)


def batch(n: int, seed: int, t: int = 3, s: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.randint(0, 256, (n, t, 3, s, s), generator=g, dtype=torch.uint8),
        "flow": torch.randint(0, 256, (n, t, 2 * L, s, s), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, K, (n,), generator=g),
    }


def one_update(model, batches, accum_steps):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    stats = train_one_epoch(
        model,
        batches,
        opt,
        sched,
        stage="fused",
        accum_steps=accum_steps,
        device=torch.device("cpu"),
        frozen_bn=True,
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
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    b, v, t, h, w = 2, 2, 25, 36, 48  # 25 frames, the full frame and its flip
    rgb, flow = torch.randn(b, v, t, 3, h, w), torch.randn(b, v, t, 2 * L, h, w)
    scores = video_scores(model, rgb, flow)
    assert set(scores) == {"appearance", "motion", "fused"}
    with torch.no_grad():
        per_view = model(rgb.flatten(0, 1), flow.flatten(0, 1))
    app = per_view.appearance.softmax(-1).reshape(b, v, K).mean(1)
    mot = per_view.motion.softmax(-1).reshape(b, v, K).mean(1)
    torch.testing.assert_close(scores["appearance"], app)
    torch.testing.assert_close(scores["fused"], (app + mot) / 2)


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
    conf = evaluate(model, batches, stage="fused", num_classes=K, device=torch.device("cpu"))
    assert set(conf) == {"appearance", "motion", "fused"}
    assert all(c.sum() == 3 for c in conf.values())
    assert np.array_equal(
        conf["fused"].sum(1), np.bincount([int(b["label"]) for b in batches], minlength=K)
    )


def test_bn_batch_must_divide_the_per_worker_share():
    with pytest.raises(ValueError, match="must divide"):
        TrainConfig(batch_size=128, num_workers=8, bn_batch=3)
    assert TrainConfig(batch_size=128, num_workers=8, bn_batch=4).accum_steps == 4
    cfg = embedded_default()
    assert cfg.accum_steps * cfg.bn_batch * cfg.num_workers == cfg.batch_size
    assert dataclasses.replace(cfg, stage="motion").crop_mode == "multiscale"
