"""Training settings, torch-free: the CLI builds `otclip train`'s flags from these defaults without
importing the training stack (so every other command starts fast)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from otclip.engine.flag_values import check_at_least, check_positive
from otclip.engine.model_identity import DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class RegularizerOptions:
    """The training settings a regularizer may read (the CLI flags of the same names)."""

    eps: float = 0.05  # --ot-eps
    rho: float | None = None  # --ot-rho
    debiased: bool = False  # --debiased
    loop_lambda: float = 1.0  # --loop-lambda
    match_rho: float | None = 0.5  # --match-rho: unbalanced pool matching, so items without a partner stay out
    match_min_mass: float = 0.5  # --match-min-mass: the share of an image's mass the plan must transport
    match_min_certainty: float = 0.0  # --match-min-certainty: the share of that mass its argmax text must hold
    match_clusters: int = 0  # --match-clusters: ot-cluster's number of categories (clusters a modality)
    match_structure: float = 0.5  # --match-structure: ot-cluster's weight of the clusters' layouts against the joint space


POSITIVES = ("pair", "label")


@dataclass
class TrainConfig:
    corpus: str
    out: str
    model: str = DEFAULT_MODEL_NAME
    reg: str = "none"
    alpha: float = 0.1
    ot_eps: float = RegularizerOptions.eps
    ot_rho: float | None = RegularizerOptions.rho
    debiased: bool = RegularizerOptions.debiased
    loop_lambda: float = RegularizerOptions.loop_lambda
    match_rho: float | None = RegularizerOptions.match_rho  # ot-match's unbalanced pool matching
    match_min_mass: float = RegularizerOptions.match_min_mass  # ot-match: share of an image's mass transported
    match_min_certainty: float = RegularizerOptions.match_min_certainty  # ot-match: share held by the argmax text
    match_clusters: int = RegularizerOptions.match_clusters  # ot-cluster: categories in the unpaired data
    match_structure: float = RegularizerOptions.match_structure  # ot-cluster: layouts' weight, 0 to 1
    positives: str = "pair"  # contrastive positives: pair (row i only) or label (every pair of the same class)
    steps: int = 300
    batch_size: int = 64
    unpaired_batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 20
    accum: int = 1
    eval_every: int = 50
    save_every: int = 50
    match_every: int = 100
    pseudo_warmup: float = 0.3  # first stage of the after-pairs and two-stage schedules: pairs alone
    unlock_image: int = 0
    unlock_text: int = 0
    seed: int = 0
    val_size: int = 1000
    save_checkpoints: bool = True  # experiments sweeping many runs turn this off

    def __post_init__(self) -> None:
        if self.positives not in POSITIVES:
            raise ValueError(f"--positives {self.positives!r}: expected one of {', '.join(POSITIVES)}")
        from .losses import lookup

        spec = lookup(self.reg)  # a one-line error naming the choices
        if spec is not None and spec.needs_clusters and self.match_clusters < 2:
            raise ValueError(f"--reg {self.reg} needs --match-clusters K: the number of categories in the unpaired data "
                             "(2 or more)")
        for name in ("ot_rho", "match_rho"):
            check_positive(f"--{name.replace('_', '-')}", getattr(self, name), " (leave it out for balanced OT)")
        check_positive("--ot-eps", self.ot_eps)
        check_positive("--lr", self.lr)
        for name in ("match_min_mass", "match_min_certainty", "match_structure", "pseudo_warmup"):  # shares
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be a share, from 0 to 1")
        for name in ("steps", "batch_size", "unpaired_batch_size", "accum", "eval_every", "save_every", "match_every"):
            check_at_least(f"--{name.replace('_', '-')}", getattr(self, name))
        # negative values would be read as something else: a slice from the end (val_size, unlock_text), ascent
        for name in ("alpha", "loop_lambda", "weight_decay", "warmup", "unlock_image", "unlock_text", "val_size",
                     "match_clusters"):
            check_at_least(f"--{name.replace('_', '-')}", getattr(self, name), 0)

    def resume_fields(self) -> dict:
        """What must match for a run directory to be resumed: steps and eval cadence may change, and the run folder is
        wherever its checkpoint is found (`resumable_paths`)."""
        d = asdict(self)
        for k in ("steps", "eval_every", "save_every", "out"):
            d.pop(k)
        return resumable_paths(d)


def resumable_paths(fields: dict) -> dict:
    """`fields` with the corpus, and the model where it names a file, as absolute paths: the same command typed in
    another folder names them by other relative paths (its resume had been refused as 'other settings'). A run
    saved before this read its relative paths from the folder the resume runs in, as before."""
    out = {k: v for k, v in fields.items() if k != "out"}
    if "corpus" in out:
        out["corpus"] = os.path.abspath(out["corpus"])
    if out.get("model") and os.path.exists(out["model"]):
        out["model"] = os.path.abspath(out["model"])
    return out


OPTION_SETTINGS = {"eps": "ot_eps", "rho": "ot_rho"}  # RegularizerOptions fields whose TrainConfig setting is renamed
SCHEDULE_SETTINGS = ("alpha", "unpaired_batch_size", "match_every", "pseudo_warmup")  # read per regularizer, below


def settings_unread_by(reg: str, names: Iterable[str]) -> list[str]:
    """The TrainConfig settings among `names` that `--reg reg` does not read (given on the command line, they would
    change nothing): another regularizer's options (`Regularizer.reads`), `--alpha` and `--unpaired-batch-size`
    without a regularizer, `--match-every` without a pool pairing, `--pseudo-warmup` on the joint schedule."""
    from .losses import lookup

    spec = lookup(reg)
    reads = {OPTION_SETTINGS.get(o, o) for o in (spec.reads if spec else ())}
    if spec is not None:
        reads |= {"alpha", "unpaired_batch_size"}
        reads |= {"match_every"} if spec.pairing is not None else set()
        reads |= {"pseudo_warmup"} if spec.schedule != "joint" else set()
    per_regularizer = {OPTION_SETTINGS.get(f.name, f.name) for f in fields(RegularizerOptions)} | set(SCHEDULE_SETTINGS)
    return sorted(n for n in set(names) if n in per_regularizer and n not in reads)


FLAG_HELP = {  # `otclip train --help`: what each TrainConfig field's flag does
    "model": "model spec or checkpoint to fine-tune",
    "reg": "the unpaired-data term: none or a registered regularizer (README's table; a wrong name lists them)",
    "alpha": "weight of the regularizer's terms against the contrastive loss",
    "ot_eps": "entropic regularisation of the OT terms (cosine cost in [0, 2])",
    "ot_rho": "unbalanced OT's marginal penalty (left out: balanced)",
    "debiased": "ot-pairwise: the debiased Sinkhorn divergence instead of OT_eps",
    "loop_lambda": "ot-loop: weight of the loop-consistency term",
    "match_rho": "ot-match: the pool matching's marginal penalty (unbalanced: items without a partner stay out)",
    "match_min_mass": "ot-match: share of an image's mass the plan must transport for a pseudo-pair",
    "match_min_certainty": "ot-match: share of that mass its best text must hold",
    "match_clusters": "ot-cluster: the number of categories in the unpaired data",
    "match_structure": "ot-cluster: weight of the clusters' layouts against the joint space, 0 to 1",
    "positives": "contrastive positives: pair (row i only) or label (every pair of the same class)",
    "steps": "optimizer steps",
    "batch_size": "pairs per step",
    "unpaired_batch_size": "unpaired images and texts per step",
    "lr": "peak learning rate (AdamW, warm-up then cosine decay)",
    "weight_decay": "AdamW weight decay",
    "warmup": "linear learning-rate warm-up, in steps",
    "accum": "batches accumulated per optimizer step",
    "eval_every": "steps between validations (best.pt is the best validation)",
    "save_every": "steps between checkpoints (last.pt: a killed run resumes from it)",
    "match_every": "steps between pool matchings (ot-match, ot-cluster, mmcl-pool)",
    "pseudo_warmup": "share of the steps trained on pairs alone (after-pairs and two-stage schedules)",
    "unlock_image": "unfreeze the image tower's last N groups as open_clip counts them (a ViT's last: its projection)",
    "unlock_text": "unfreeze the text tower's last N layers as open_clip counts them (CLIP's last: its projection)",
    "seed": "random seed (batches, initialisation)",
    "val_size": "validation pairs used, at most",
}
