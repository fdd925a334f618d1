"""Shared fixtures: tiny models trained once per test session on the smoke world."""

from types import SimpleNamespace

import pytest

from stagewise.stages import common, pretrain, sft


def smoke(cls, section, *overrides):
    return common.resolve(cls, section, SimpleNamespace(preset="smoke", overrides=list(overrides)))


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "base"
    return pretrain.train(smoke(pretrain.PretrainConfig, "pretrain", "max_steps=60"), out, log=lambda *a: None)


@pytest.fixture(scope="session")
def smoke_sft(smoke_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "sft"
    return sft.train(smoke(sft.SFTConfig, "sft"), smoke_base, out, log=lambda *a: None)


@pytest.fixture(scope="session")
def smoke_config():
    """smoke(cls, section, *overrides): a stage's config from the smoke preset."""
    return smoke
