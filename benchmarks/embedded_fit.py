"""The embedded default's training, in one plain PyTorch process (no Ray): how the preset of
``stm.config.embedded_default()`` was chosen (docs/performance.md, "The embedded default").

    python jobs/train.py                                 # once: prepares ./data/synthetic
    python benchmarks/embedded_fit.py --data data/synthetic
    python benchmarks/embedded_fit.py --data data/synthetic --no-zero-init-residual --lr 0.002 \
        --crop-size 64 --epochs 12 --lr-milestones 9 --motion-dropout 0.5

Every flag of ``jobs/train.py`` applies (its preset is the embedded default). Same sampling
(``train_batch`` / ``test_batch``), step (``train_one_epoch``) and test protocol (``evaluate``)
as the Ray job, on one process with ``--threads`` torch threads: per epoch it prints the train
loss (chance: 2 ln K for the two streams' summed losses) and clip accuracies, and every
``--eval-every`` epochs the test video accuracy of each stream and of the fusion.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stm.cli import add_config_flags, build_config, fail, parser_for  # noqa: E402
from stm.config import TrainConfig, embedded_default  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = parser_for("embedded_fit.py", __doc__)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    add_config_flags(parser, TrainConfig)
    args = vars(parser.parse_args(argv))
    threads = args.pop("threads")
    cfg = build_config(parser.prog, embedded_default(), args)
    if not cfg.data:
        fail(parser.prog, "--data: a prepared dataset (python jobs/train.py makes data/synthetic)")

    import pyarrow.dataset as pads

    from stm.data.clips import test_batch, test_clip_spec, train_batch, train_clip_spec
    from stm.data.shards import in_split
    from stm.model import build_model
    from stm.storage import resolve
    from stm.train.steps import accuracy, evaluate, lr_factor, train_one_epoch

    fs, root = resolve(cfg.data)
    try:
        table = pads.dataset(f"{root.rstrip('/')}/shards", filesystem=fs).to_table()
    except (FileNotFoundError, OSError) as err:
        fail(parser.prog, f"--data {cfg.data}: no shards ({err})")
    train = table.filter(in_split(table, cfg.split, True))
    test = table.filter(in_split(table, cfg.split, False))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cpu")
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    per_epoch = train.num_rows // cfg.batch_size
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: lr_factor(u, per_epoch, cfg.lr_milestones)
    )
    accum = cfg.batch_size // cfg.bn_batch  # one process does all workers' micro-batches
    print(
        f"embedded_fit: {train.num_rows} train / {test.num_rows} test videos, "
        f"{cfg.model.variant}, lr {cfg.lr}, crop {cfg.crop_size}, {cfg.epochs} epochs, "
        f"chance loss {2 * math.log(cfg.model.num_classes):.2f}",
        flush=True,
    )
    train_spec, test_spec = train_clip_spec(cfg), test_clip_spec(cfg)
    start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(train.num_rows)
        batches = [
            {
                k: torch.from_numpy(v)
                for k, v in train_batch(
                    train.take(order[i : i + cfg.bn_batch]), train_spec, seed=None
                ).items()
            }
            for i in range(0, len(order) - cfg.bn_batch + 1, cfg.bn_batch)
        ]
        stats = train_one_epoch(
            model, batches, optimizer, scheduler, stage=cfg.stage, accum_steps=accum, device=device
        )
        line = " ".join(f"{k} {v:.3f}" for k, v in stats.as_metrics().items() if "acc" in k)
        line = f"epoch {epoch}: loss {stats.as_metrics()['train_loss']:.3f} {line}"
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            views = (
                {k: torch.from_numpy(v) for k, v in test_batch(test.slice(i, 1), test_spec).items()}
                for i in range(test.num_rows)
            )
            protocol = (cfg.test_pool, cfg.score_fusion)
            confusion = evaluate(
                model, views, stage=cfg.stage, num_classes=cfg.model.num_classes, device=device,
                window=cfg.num_chunks, protocols=(protocol,),
            )[protocol]  # fmt: skip
            line += " | test " + " ".join(f"{k} {accuracy(c):.3f}" for k, c in confusion.items())
        print(f"{line} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
