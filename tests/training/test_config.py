"""Bad training settings are refused up front, in one line naming the flag."""

import pytest

from otclip.training.trainer import TrainConfig


@pytest.mark.parametrize("field,value,flag", [("ot_rho", -1.0, "--ot-rho"), ("match_rho", 0.0, "--match-rho"),
                                              ("ot_eps", 0.0, "--ot-eps"), ("reg", "mmcl-pseudo", "--reg"),
                                              ("match_min_certainty", 1.5, "--match-min-certainty"),
                                              ("match_min_mass", -0.1, "--match-min-mass"),
                                              ("match_structure", 1.2, "--match-structure")])
def test_bad_settings_name_their_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(corpus="c", out="o", **{field: value})


def test_ot_cluster_asks_for_the_number_of_categories():
    with pytest.raises(ValueError, match="--reg ot-cluster needs --match-clusters"):
        TrainConfig(corpus="c", out="o", reg="ot-cluster")
    assert TrainConfig(corpus="c", out="o", reg="ot-cluster", match_clusters=10).match_clusters == 10
