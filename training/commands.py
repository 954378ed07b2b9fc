"""Training subcommands: `otclip data fashion-mnist` and `otclip train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from otclip.engine.model_identity import DEFAULT_MODEL_NAME


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build a partially-paired corpus from real data")
    p.add_argument("dataset", choices=["fashion-mnist"], help="the dataset (Debian's dataset-fashion-mnist)")
    p.add_argument("--out", type=Path, required=True, help="corpus folder to write (train/val/test.jsonl, images)")
    p.add_argument("--pair-fraction", type=float, default=0.05,
                   help="share of the seen-class training images that keep their caption (default: %(default)s)")
    p.add_argument("--unseen", default="", help='classes held out of training, e.g. "sandal,bag,ankle boot"')
    p.add_argument("--seed", type=int, default=0, help="which images are drawn and paired (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=10_000, help="training images (default: %(default)s)")
    p.add_argument("--val-size", type=int, default=1_000, help="validation pairs (default: %(default)s)")
    p.add_argument("--open-world", action="store_true",
                   help="unseen classes get no pairs but appear among the unpaired images and texts")
    p.add_argument("--test-size", type=int, default=2_000, help="test pairs (default: %(default)s)")
    p.set_defaults(func=_data)

    from .config import FLAG_HELP, POSITIVES, TrainConfig

    CHOICES = {"positives": list(POSITIVES)}  # --reg is checked by TrainConfig against the registry

    p = sub.add_parser("train", help="fine-tune a model on a partially-paired corpus")
    p.add_argument("--corpus", required=True,
                   help="corpus folder (train and val manifests: .jsonl, .csv or .parquet) or one manifest")
    p.add_argument("--out", required=True, help="run directory (log.jsonl, best.pt, last.pt); resumes if present")
    for f in dataclasses.fields(TrainConfig):  # the defaults, without validating (that imports the registry)
        name, value = f.name, f.default
        if name in ("corpus", "out", "save_checkpoints"):  # save_checkpoints is for sweeps through the API
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action=_GivenFlag, help=FLAG_HELP[name])
        else:
            kind = float if name == "ot_rho" else type(value)
            p.add_argument(flag, type=kind, default=value, choices=CHOICES.get(name), action=_Given,
                           help=f"{FLAG_HELP[name]} (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("wise-ft", help="interpolate a fine-tuned checkpoint with its zero-shot model (WiSE-FT)")
    p.add_argument("checkpoint", type=Path, help="a training run's best.pt or last.pt")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned model (default: %(default)s)")
    p.add_argument("--zero-shot", default=None, help="the model it was fine-tuned from (default: the run's --model)")
    p.add_argument("--out", type=Path, required=True, help="the interpolated checkpoint to write")
    p.set_defaults(func=_wise_ft)

    p = sub.add_parser("eval", help="retrieval recall and zero-shot accuracy of a model on a test corpus")
    p.add_argument("--model", default=None,
                   help=f"model spec or checkpoint (default: the --index's model, else {DEFAULT_MODEL_NAME})")
    p.add_argument("--corpus", type=Path, required=True, help="test manifest (pairs; labels for zero-shot)")
    p.add_argument("--relevance", choices=["pair", "label"], default="pair")
    p.add_argument("--unseen", default=None, help="unseen classes (default: from corpus.json beside the manifest)")
    p.add_argument("--index", type=Path, default=None, help="search through this index directory (text -> image)")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    p.add_argument("--md", type=Path, default=None, help="write the report as Markdown")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_eval)


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given: `otclip train` refuses a flag its --reg does not read."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


class _GivenFlag(_Given):
    """A flag without a value (store_true), noted like `_Given`."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, True, option_string)


def _eval(args: argparse.Namespace) -> int:
    from otclip.engine import load_model
    from otclip.engine.atomic_files import write_json_atomically, write_lines_atomically
    from otclip.engine.index_directory import IndexDirectory, model_of

    from .evaluation import evaluate, format_report

    unseen = [c.strip() for c in args.unseen.split(",") if c.strip()] if args.unseen else None
    model = args.model or (model_of(IndexDirectory(args.index)) if args.index else DEFAULT_MODEL_NAME)
    report = evaluate(load_model(model), args.corpus, args.relevance, unseen, args.index, progress=not args.no_progress)
    text = format_report(report)
    print(text)
    if args.out:
        write_json_atomically(args.out, report)
    if args.md:
        write_lines_atomically(args.md, [text])
    return 0


def _wise_ft(args: argparse.Namespace) -> int:
    from .wise_ft import wise_ft

    print(wise_ft(args.checkpoint, args.alpha, args.out, args.zero_shot))
    return 0


def _data(args: argparse.Namespace) -> int:
    from .fashion_corpus import build_fashion_mnist_corpus

    info = build_fashion_mnist_corpus(args.out, args.pair_fraction, args.unseen, args.seed, args.train_size,
                                      args.val_size, args.test_size, open_world=args.open_world)
    print(json.dumps(info))
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import settings_unread_by
    from .trainer import TrainConfig, Trainer

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    unread = settings_unread_by(args.reg, getattr(args, "given", ()))
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        one = len(unread) == 1
        raise ValueError(f"--reg {args.reg} does not read {flags} ({'it' if one else 'they'} would change nothing): "
                         f"leave {'it' if one else 'them'} out, or choose the regularizer {'it is' if one else 'they are'} "
                         "for (`otclip train --help`)")
    trainer = Trainer(TrainConfig(**fields), progress=not args.no_progress)
    if trainer.unreadable and trainer.ranks.rank == 0:
        print(f"otclip train: skipped the rows of {len(trainer.unreadable)} unreadable image(s), listed in "
              f"{Path(args.out) / 'errors.jsonl'}", file=sys.stderr)
    if trainer.validates_training_pairs and trainer.ranks.rank == 0:
        print(f"otclip train: validation on {trainer.validation_source()}", file=sys.stderr)
    summary = trainer.train()
    if summary:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items() if k != "event"))
    return 0
