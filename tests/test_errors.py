"""Tests of thunderline_lab.errors: the did-you-mean hint of every "unknown name" error."""

from __future__ import annotations

from thunderline_lab.errors import closest_names, did_you_mean

METRICS = ["epochs", "fgsm_acc_0.01", "lr", "sigma/net.0", "sigma/net.2", "test_accuracy"]


def test_a_name_a_known_one_begins_is_suggested() -> None:
    # too short a part of the name for a near miss: it got no hint
    space = ["depth", "lr", "n_power_iterations", "width"]
    assert did_you_mean("n_power", space) == " (did you mean 'n_power_iterations'?)"
    assert did_you_mean("lr", ["lr", "lr_decay"]) == " (did you mean 'lr_decay'?)"  # never itself
    assert did_you_mean("x", ["x_max", "lr"]) == ""  # one letter begins too much
    # the shortest name it begins first; case and punctuation aside
    assert closest_names("Val-Acc", ["val_accuracy_top5", "val_accuracy", "lr"]) == [
        "val_accuracy",
        "val_accuracy_top5",
    ]


def test_a_name_that_begins_a_word_of_a_known_one_is_suggested() -> None:
    known = ["lr", "test_nll", "train_nll", "tunnll_total"]
    assert did_you_mean("nll", known) == " (did you mean 'test_nll'?)"
    assert closest_names("nll", known) == ["test_nll", "train_nll"]
    # a near miss still comes before a name it begins
    assert closest_names("study", ["study_config_old", "studdy"]) == ["studdy", "study_config_old"]


def test_did_you_mean_names_the_n_closest() -> None:
    assert did_you_mean("sigma", METRICS, n=3) == " (did you mean 'sigma/net.0' or 'sigma/net.2'?)"
    assert did_you_mean("sigma", METRICS) == " (did you mean 'sigma/net.0'?)"  # one by default
    assert did_you_mean("studdy", ["study", "studies", "stud"]) == " (did you mean 'study'?)"
    assert did_you_mean("lwo", ["high", "log", "low"]) == " (did you mean 'low'?)"  # not 'log'
    assert did_you_mean("zzz", METRICS, n=3) == ""
