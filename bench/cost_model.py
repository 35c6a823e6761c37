"""The cost model against the clock: predicted vs measured epoch seconds of random configs.

    .venv/bin/python bench/cost_model.py                    # 14 seed-cnn configs on ../shared/data/catdog-kaggle-3k
    .venv/bin/python bench/cost_model.py --configs 4        # quick (about 2 minutes)
    .venv/bin/python bench/cost_model.py --channels-last    # also time each config in NHWC
    .venv/bin/python bench/cost_model.py --dataset synthetic --space quick --configs 3   # smoke

Calibrates as a budgeted study does (engine.cost.calibrate: three reference CNNs on a slice of
the images), then samples configs from the space with Optuna's random sampler, times two epochs
of each on a slice of the images (the quicker epoch counts) and divides by the uncorrected
prediction. The study corrects every prediction by the median of these ratios, so what matters is
their spread: max/min is how far apart two configs' errors can be after the correction.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import data_flags  # noqa: E402  (bench/budget.py)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=14, help="random configs to time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--space", default="seed-cnn")
    p.add_argument("--train", type=int, default=640, help="training images per timed epoch")
    p.add_argument("--val", type=int, default=320, help="validation images per timed epoch")
    p.add_argument("--channels-last", action="store_true", help="also time NHWC (the model is calibrated in NCHW)")
    p.add_argument("--data", default=None)
    p.add_argument("--dataset", default=None)
    args = p.parse_args(argv)
    flags = data_flags(args)
    if flags is None:
        print("skipped: no data (../shared/data/catdog-kaggle-3k absent; pass --data DIR or --dataset NAME)")
        return 0

    import optuna
    import torch

    from catdog_hpo.data import DataSource, ImageSet, load_images
    from catdog_hpo.engine.cost import calibrate, workload
    from catdog_hpo.engine.models import model_cost
    from catdog_hpo.engine.runtime import Runtime
    from catdog_hpo.engine.train import fit
    from catdog_hpo.search.space_files import base_image_size, load_space
    from catdog_hpo.search.spaces import resolve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    size = base_image_size(space)
    source = DataSource(name=flags[1]) if flags[0] == "--dataset" else DataSource(path=flags[1])
    data = load_images(source, size, Path("studies/cache"))
    n, m = min(args.train, len(data.train_y)), min(args.val, len(data.val_y))
    part = ImageSet(data.train_x[:n], data.train_y[:n], data.val_x[:m], data.val_y[:m], data.classes, "bench")
    cpu = torch.device("cpu")
    cal = calibrate(data, cpu)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rows = []
    for i in range(args.configs):
        cfg = resolve(space, sampler.ask())
        cfg = replace(cfg, train=replace(cfg.train, epochs=2))
        cost = model_cost(cfg.model, len(data.classes), size)
        w = workload(cfg, cost.flops, cost.params, len(data.classes), n, m)
        predicted = cal.epoch_seconds(w)
        formats = (False, True) if args.channels_last else (False,)
        times = [min(h.seconds for h in fit(cfg, part, cpu, runtime=Runtime(channels_last=cl)).history)
                 for cl in formats]
        rows.append((i, cfg, w, predicted, times))
        print(f"config {i}: {times[0]:.2f} s measured, {predicted:.2f} s predicted", file=sys.stderr, flush=True)

    print(f"\n{args.space} at {size} px, {n} train + {m} val images per epoch; calibration: "
          f"{cal.flop_rate:.3g} FLOP/s, {cal.act_s:.3g} s per activation value, {cal.step_s:.3g} s per layer-step\n")
    head = "| config | blocks (channels/kernel/convs) | batch | MFLOPs/img | act values/img | predicted s | measured s | ratio |"
    print(head + (" NHWC s | NHWC/NCHW |" if args.channels_last else ""))
    print("|---" * (8 + 2 * args.channels_last) + "|")
    for i, cfg, w, predicted, times in rows:
        blocks = " ".join(f"{b.channels}/{b.kernel_size}/{b.convs}" for b in cfg.model.blocks)
        line = (f"| {i} | {blocks} | {w.batch_size} | {w.flops / 1e6:.0f} | {w.acts:,} | {predicted:.2f} | "
                f"{times[0]:.2f} | {times[0] / predicted:.2f} |")
        if args.channels_last:
            line += f" {times[1]:.2f} | {times[1] / times[0]:.2f} |"
        print(line)
    ratios = [t[0] / pr for _, _, _, pr, t in rows]
    print(f"\nmeasured/predicted: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}, spread (max/min) {max(ratios) / min(ratios):.2f}")
    if args.channels_last:
        total = sum(t[1] for *_, t in rows) / sum(t[0] for *_, t in rows)
        print(f"NHWC total / NCHW total: {total:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
