"""Config: presets, dotted overrides, and refusals that name the key."""

from dataclasses import dataclass, field

import pytest

from stagewise import config
from stagewise.errors import StagewiseError
from stagewise.world.build import DataConfig


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Example:
    steps: int = 10
    name: str = "x"
    schedule: str | None = None
    compile: bool = False
    optim: Optim = field(default_factory=Optim)


def test_dotted_overrides_are_typed():
    cfg = config.resolve(Example, "example", None, ["optim.lr=3e-4", "steps=5", "compile=true", "schedule=cosine",
                                                     "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.steps == 5 and cfg.compile is True and cfg.schedule == "cosine"
    assert cfg.optim.betas == [0.8, 0.9]
    assert config.resolve(Example, "example", None, ["optim.lr=1"]).optim.lr == 1.0  # int widens to float


def test_an_override_inside_a_mapping_keeps_its_other_keys():
    default = DataConfig().task_weights
    cfg = config.resolve(DataConfig, "data", None, ["task_weights.json_record=3", "task_weights.facts=0.5"])
    assert cfg.task_weights == {**default, "json_record": 3.0, "facts": 0.5}
    with pytest.raises(StagewiseError, match=r"task_weights\.facts: expected float"):
        config.resolve(DataConfig, "data", None, ["task_weights.facts=many"])


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; accepted keys under optim: lr, betas"),
    ("stepz=1", "unknown key 'stepz'; accepted keys: steps, name, schedule, compile, optim"),
    ("steps=1.5", "steps: expected int, got 1.5"),
    ("compile=yes please", "compile: expected true or false"),
    ("steps", "expected key=value"),
    ("optim=3", "optim: expected a mapping"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(StagewiseError, match="override") as e:
        config.resolve(Example, "example", None, [override])
    assert message in str(e.value)


def test_every_shipped_preset_loads():
    assert {"smoke", "default"} <= set(config.preset_names())
    for preset in config.preset_names():
        sections = config.load_preset(preset)
        cfg = config.resolve(DataConfig, "data", preset, [])
        assert cfg.n_eval_per_task > 0 and "data" in sections


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(StagewiseError, match="available presets: .*default.*smoke"):
        config.resolve(DataConfig, "data", "huge", [])
