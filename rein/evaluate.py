"""``python -m rein.evaluate --checkpoint FILE --target cityscapes=PATH ... --out DIR``:
evaluate a checkpoint that ``rein.train`` wrote, or an official Rein checkpoint (mmseg
format; with ``--backbone-checkpoint`` for the frozen DINOv2 weights), by the official
protocol (``rein.inference``), writing what training writes after its last iteration:
``metrics.json`` and sample pictures (``rein.metrics``). ``--target synthetic`` evaluates
on the validation domains of ``rein.train``'s synthetic default run, as that run did.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import (FLAG_NAMES, PRECISION_MEANS, USER_ERRORS, add_mapillary_flag, add_model_flags, autocast,
                  check_out_folder, device_from_flag, ignored_flags, official_flags, parser, report,
                  resolve_precision, use_precision)
from .data import datasets_from, synthetic_validation
from .metrics import evaluate_targets
from .model import load_model


def main(argv=None) -> int:
    ap = parser("rein-evaluate", __doc__)
    add_model_flags(ap)
    ap.add_argument("--target", metavar="KIND=PATH", action="append", required=True,
                    help="dataset to evaluate (repeat): cityscapes=..., bdd100k=..., mapillary=..., acdc-fog=..., "
                         "or synthetic (the synthetic validation domains of rein.train's default run)")
    add_mapillary_flag(ap)
    ap.add_argument("--out", required=True, help="output folder (metrics.json, samples/)")
    args = ap.parse_args(argv)
    try:
        device = device_from_flag(args.device)
        out = Path(args.out)
        check_out_folder(out, "metrics.json and samples/")
        specs = [t for t in args.target if t != "synthetic"]
        datasets = datasets_from([(t, "val", "--target") for t in specs], args.mapillary_half)
        model, config = load_model(args.checkpoint, args.backbone_checkpoint, device, args.fused,
                                   official=official_flags(args), names=FLAG_NAMES)
        if "synthetic" in args.target:
            datasets = synthetic_validation(config.crop) + datasets
    except USER_ERRORS as e:
        return report("rein-evaluate", e)
    for line in ignored_flags(args, config, args.checkpoint):
        print(f"rein-evaluate: WARNING: {line}", file=sys.stderr)
    precision, why = resolve_precision(args.precision, device)
    print(f"rein-evaluate: precision {precision}, {PRECISION_MEANS[precision]}; {why}")
    use_precision(precision, device)
    failed = evaluate_targets(model, datasets, config.crop, device, out, lambda: autocast(precision, device),
                              cuda_graphs=args.cuda_graphs)
    print(f"rein-evaluate: wrote {out / 'metrics.json'} and {out / 'samples'}/")
    for msg in failed:
        print(f"rein-evaluate: evaluation stopped on a bad file: {msg}", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
