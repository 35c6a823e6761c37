"""The cost model against the clock: predicted vs measured epoch seconds of random configs.

    .venv/bin/python bench/cost_model.py                    # 14 seed-cnn configs on ../shared/data/catdog-kaggle-3k
    .venv/bin/python bench/cost_model.py --configs 4        # quick
    .venv/bin/python bench/cost_model.py --dataset synthetic --space quick --configs 3   # smoke

Calibrates as a budgeted study does (engine.cost.calibrate: three reference CNNs on a slice of
the images), then samples configs from the space with Optuna's random sampler, times two epochs
of each on a slice of the images (the quicker epoch counts) and divides by the uncorrected
prediction. The study corrects every prediction by the median of these ratios, so what matters is
their spread: max/min is how far apart two configs' errors can be after the correction.

Every config trains with the runtime a study's trial gets (engine.runtime.for_device, which fit
uses when a trial passes none: on the CPU channels_last, bf16 autocast where the CPU has it),
on the CPU with torch's default threads, as one CPU worker runs. Timing another layout or
precision than the trials' measured a cost no study pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget import data_flags  # noqa: E402  (bench/budget.py)

if TYPE_CHECKING:
    from catdog_hpo.engine.runtime import Runtime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=14, help="random configs to time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--space", default="seed-cnn")
    p.add_argument("--train", type=int, default=640, help="training images per timed epoch")
    p.add_argument("--val", type=int, default=320, help="validation images per timed epoch")
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
    from catdog_hpo.engine.runtime import for_device
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
    runtimes: set[str] = set()  # one per config; the same for all unless a space varies train.amp
    for i in range(args.configs):
        cfg = resolve(space, sampler.ask())
        cfg = replace(cfg, train=replace(cfg.train, epochs=2))
        cost = model_cost(cfg.model, len(data.classes), size)
        w = workload(cfg, cost.flops, cost.params, len(data.classes), n, m)
        predicted = cal.epoch_seconds(w)
        rt = for_device(cpu, cfg.train)  # what fit picks for a study's trial (it passes no runtime)
        runtimes.add(describe(rt))
        measured = min(h.seconds for h in fit(cfg, part, cpu, runtime=rt).history)
        rows.append((i, cfg, w, predicted, measured))
        print(f"config {i}: {measured:.2f} s measured, {predicted:.2f} s predicted", file=sys.stderr, flush=True)

    print(f"\n{args.space} at {size} px, {n} train + {m} val images per epoch, runtime: {'; '.join(sorted(runtimes))}, "
          f"{torch.get_num_threads()} CPU threads; calibration: {cal.flop_rate:.3g} FLOP/s, "
          f"{cal.act_s:.3g} s per activation value, {cal.step_s:.3g} s per layer-step\n")
    print("| config | blocks (channels/kernel/convs) | batch | MFLOPs/img | act values/img | predicted s | measured s | ratio |")
    print("|---" * 8 + "|")
    for i, cfg, w, predicted, measured in rows:
        blocks = " ".join(f"{b.channels}/{b.kernel_size}/{b.convs}" for b in cfg.model.blocks)
        print(f"| {i} | {blocks} | {w.batch_size} | {w.flops / 1e6:.0f} | {w.acts:,} | {predicted:.2f} | "
              f"{measured:.2f} | {measured / predicted:.2f} |")
    ratios = [measured / predicted for *_, predicted, measured in rows]
    print(f"\nmeasured/predicted: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f}, spread (max/min) {max(ratios) / min(ratios):.2f}")
    return 0


def describe(rt: Runtime) -> str:
    """The runtime's layout and precision in words, for the table's header."""
    precision = f"{str(rt.autocast).removeprefix('torch.')} autocast" if rt.autocast is not None else "fp32"
    return f"{'channels_last' if rt.channels_last else 'NCHW'} + {precision}"


if __name__ == "__main__":
    raise SystemExit(main())
