"""Bad training settings are refused up front, in one line naming the flag."""

import pytest

from otclip.training.trainer import TrainConfig


@pytest.mark.parametrize("field,value,flag", [("ot_rho", -1.0, "--ot-rho"), ("match_rho", 0.0, "--match-rho"),
                                              ("ot_eps", 0.0, "--ot-eps"), ("reg", "mmcl-pseudo", "--reg"),
                                              ("match_min_certainty", 1.5, "--match-min-certainty"),
                                              ("match_min_mass", -0.1, "--match-min-mass"),
                                              ("match_structure", 1.2, "--match-structure"),
                                              ("lr", 0.0, "--lr 0.0: must be positive"),
                                              ("match_every", 0, "--match-every 0: must be at least 1"),
                                              ("lr", float("nan"), "--lr nan: must be positive"),
                                              ("loop_lambda", float("inf"), "--loop-lambda inf: expected a finite"),
                                              ("pseudo_warmup", 1.5, "--pseudo-warmup 1.5: must be a share"),
                                              ("val_size", -5, "--val-size -5: must not be negative"),
                                              ("unlock_text", -2, "--unlock-text -2: must not be negative"),
                                              ("alpha", -0.1, "--alpha -0.1: must not be negative")])
def test_bad_settings_name_their_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(corpus="c", out="o", **{field: value})


def test_ot_cluster_asks_for_the_number_of_categories():
    with pytest.raises(ValueError, match="--reg ot-cluster needs --match-clusters"):
        TrainConfig(corpus="c", out="o", reg="ot-cluster")
    assert TrainConfig(corpus="c", out="o", reg="ot-cluster", match_clusters=10).match_clusters == 10


def test_every_train_flag_says_what_it_does():
    """`otclip train --help` describes each flag built from TrainConfig's fields (none left blank)."""
    import argparse
    import dataclasses

    from otclip.training.commands import register

    commands = argparse.ArgumentParser().add_subparsers()
    register(commands)
    helps = {a.dest: a.help for a in commands.choices["train"]._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("corpus", "out", "save_checkpoints"):
            assert helps[f.name] and not helps[f.name].startswith(" ("), f.name
