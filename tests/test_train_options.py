"""``bmrs train``'s options are made from TrainConfig's fields (one statement of each setting's default, choices and
help), and a config turned back into options (the reproduction's jobs) parses to the same config."""

from __future__ import annotations

import dataclasses

import pytest

from bmrs.cli import build_parser, train_config
from bmrs.errors import ConfigError
from bmrs.training import TrainConfig
from bmrs.training.options import config_settings, option_name, train_argv


def _parse(*argv: str):
    return build_parser().parse_args(["train", *argv])


def _train_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"].format_help()


def test_no_options_give_the_configs_defaults():
    assert train_config(_parse()) == TrainConfig()


def test_every_option_field_is_an_option_with_its_help_and_choices():
    help_text = " ".join(_train_help().split())
    option_fields = [f for f in dataclasses.fields(TrainConfig) if "group" in f.metadata]
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {f.name for f in option_fields} == {"val_fraction",
                                                                                                    "extra"}
    for f in option_fields:
        assert option_name(f.name) in help_text, f.name
        for choice in f.metadata.get("choices", ()):
            assert choice in help_text, (f.name, choice)
    assert "--kl {mean,structure-mean,elbo}" in help_text and "--no-noise" in help_text
    assert "KL weighting: the mean over all structures" in help_text


@pytest.mark.parametrize("settings", [
    {},
    {"model": "mlp", "hidden": 16, "layers": 2, "kl_reduction": "elbo", "kl_weight": 100.0, "seed": 3},
    {"criterion": "none", "noise": False, "device": "cpu", "threads": 1, "compile": True, "download": True},
    {"criterion": "l2", "amount_schedule": [3, 0, 2], "shrink": True, "lr": 1.5e-3, "train_subset": 300},
    {"criterion": "snr", "threshold": 0.75, "granularity": "element", "low": -10.0, "high": 0.5, "p1": 4.0},
    {"criterion": "bmrs-u", "p1": 4.0, "amount": 0.25, "evidence_margin": 0.0, "noise_lr_scale": 1.0,
     "finetune": "noisy", "epochs": 3, "finetune_epochs": 1, "prune_every": 3, "batch_size": 7, "image_size": 28,
     "dataset": "mnist", "data_dir": "some/folder"},
])
def test_a_config_turned_into_options_parses_back_to_itself(settings):
    config = TrainConfig(**settings)
    argv = train_argv(config)
    assert train_config(_parse(*argv)) == config
    assert train_argv(settings) == argv  # (only the settings that differ from the defaults are stated)


def test_options_name_the_setting_they_set():
    assert train_argv({"kl_reduction": "elbo", "noise": False, "batch_size": 8}) == [
        "--batch-size", "8", "--kl", "elbo", "--no-noise"]
    assert config_settings(_parse("--kl", "mean", "--no-noise"))["kl_reduction"] == "mean"


def test_settings_that_bmrs_train_cannot_take_are_refused():
    with pytest.raises(ConfigError, match="val_fraction"):
        train_argv({"val_fraction": 0.1})
    with pytest.raises(ConfigError, match="unknown config keys"):
        train_argv({"learning_rate": 0.1})
    assert train_argv({"val_fraction": 0.2, "extra": {}}) == []  # their defaults need no option
