"""`catdog-hpo predict`: class and probability of each image, from a checkpoint, ONNX or TorchScript."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catdog_hpo.cli.common import add_device_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images with a retrained model (.pt, .onnx, .pt2 or .ts)",
        description="Print the predicted class and its probability for each image (folders are "
        "searched recursively for image files). Images are decoded exactly as training decodes "
        "them. A .onnx, .pt2 or .ts file from retrain carries its class names, image size and "
        "normalisation in its own metadata, so it needs no other file; ONNX runs on the CPU "
        "with onnxruntime (--device applies to .pt, .pt2 and .ts).",
        epilog="An image that cannot be read is reported on its own row (JSON: an \"error\" key) "
        "and the others go on. Exit status: 0 when at least one image was predicted; 2 when none "
        "was, or the model cannot be loaded.",
    )
    p.add_argument("--model", required=True, type=Path, metavar="PATH",
                   help="model.pt (checkpoint), model.onnx, model.pt2 (torch.export) or model.ts (TorchScript)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE|DIR", help="image files or folders")
    p.add_argument("--json", action="store_true",
                   help="JSON lines: one object per image (image, class, probability, probabilities | error)")
    add_device_arg(p, "where a .pt, .pt2 or .ts model runs (ONNX always runs on the CPU)")
    p.set_defaults(handler=_handle)


def _handle(args: argparse.Namespace) -> int:
    from catdog_hpo.engine.device import resolve_device
    from catdog_hpo.errors import UserError
    from catdog_hpo.ship.predict import format_table, json_lines, load_predictor, predict

    predictor = load_predictor(args.model, resolve_device(args.device))
    rows = predict(predictor, args.images)
    print(json_lines(rows) if args.json else format_table(rows))
    sys.stdout.flush()
    n_ok = sum(r.error is None for r in rows)
    if n_ok == 0:
        raise UserError(f"none of the {len(rows)} inputs could be predicted")
    return 0
