"""Each regularizer declares the options it reads (`Regularizer.reads`), and `otclip train` refuses a flag that its
--reg does not read. The declarations are checked against behaviour: changing an option changes a regularizer's
terms or pool pairing exactly when it is declared."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F

from otclip.training.config import RegularizerOptions
from otclip.training.losses import REGISTRY, StepEmbeddings
from otclip.training.matching import PoolFeatures

CHANGED = {"eps": 0.5, "rho": 0.2, "debiased": True, "loop_lambda": 5.0, "match_rho": None, "match_min_mass": 0.95,
           "match_min_certainty": 0.9, "match_clusters": 2, "match_structure": 1.0}


def _outputs(spec, options: RegularizerOptions) -> list:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    labels = torch.arange(48) % 4

    def points(noise: float) -> torch.Tensor:
        return F.normalize(centres[labels] + noise * torch.randn(48, 16, generator=g), dim=-1)

    x, y, px, py = points(0.6), points(0.6), points(0.6)[:16], points(0.6)[:16]
    e = StepEmbeddings(pair_images=px, pair_texts=py, images=x, texts=y, logit_scale=torch.tensor(2.0))
    out = [{k: round(float(v), 6) for k, v in spec.build(options)(e).items()}]
    if spec.pairing is not None:
        m = spec.pairing(x, y, options, 0, PoolFeatures(x, y, px, py))
        out.append([m.images.tolist(), m.texts.tolist(), [round(float(w), 6) for w in m.weights]])
    return out


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_regularizer_reads_exactly_the_options_it_declares(name):
    spec = REGISTRY[name]
    assert set(CHANGED) == {f.name for f in fields(RegularizerOptions)}
    base = RegularizerOptions(match_clusters=4)
    before = _outputs(spec, base)
    changes = {option for option, value in CHANGED.items() if _outputs(spec, replace(base, **{option: value})) != before}
    assert changes == set(spec.reads)


def _train(*flags: str):
    from otclip.training.commands import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--corpus", "no-such-corpus", "--out", "o", *flags])
    return args.func(args)


@pytest.mark.parametrize(("flags", "refused"), [
    (["--reg", "ot-pairwise", "--loop-lambda", "2", "--match-clusters", "3"], "--loop-lambda, --match-clusters"),
    (["--reg", "ot-pairwise", "--loop-lambda", "1.0"], "--loop-lambda"),  # given, even at its default
    (["--alpha", "0.5"], "--alpha"),  # --reg none
    (["--reg", "ot-loop", "--debiased"], "--debiased"),
    (["--reg", "ot-barycenter", "--ot-rho", "1"], "--ot-rho"),
    (["--reg", "ot-cluster", "--match-clusters", "8", "--ot-eps", "0.1"], "--ot-eps"),
    (["--reg", "ot-pairwise", "--match-every", "5"], "--match-every"),
    (["--reg", "ot-pairwise", "--pseudo-warmup", "0.3"], "--pseudo-warmup"),
])
def test_a_flag_the_regularizer_does_not_read_is_refused(flags, refused):
    reg = flags[flags.index("--reg") + 1] if "--reg" in flags else "none"
    with pytest.raises(ValueError, match=f"--reg {reg} does not read {refused} "):
        _train(*flags)


@pytest.mark.parametrize("flags", [
    ["--reg", "ot-loop", "--loop-lambda", "2", "--ot-rho", "1", "--alpha", "0.2", "--unpaired-batch-size", "64"],
    ["--reg", "ot-match", "--match-every", "5", "--pseudo-warmup", "0.3", "--match-rho", "1", "--ot-eps", "0.1"],
    ["--reg", "ot-cluster", "--match-clusters", "8", "--match-structure", "0.3", "--match-every", "3"],
    ["--reg", "ot-pairwise", "--debiased", "--steps", "5", "--positives", "label"],
])
def test_the_flags_a_regularizer_reads_pass_to_the_corpus_check(flags):
    with pytest.raises(ValueError, match="no-such-corpus: corpus manifest not found"):  # past the flags
        _train(*flags)
