"""The catalogue commands: `methods` prints SPEC section 1, `advise` reasons from the catalogue."""

import json
from dataclasses import replace

import pytest

from stagewise import advise, cli, methods

ALL = list(methods.CATALOGUE)


def run(capsys, *args):
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_methods_table_and_json(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["method", "id", "stage", "family", "applied", "at", "changes", "weights", "needs"]
    for m in methods.CATALOGUE.values():
        assert any(line.startswith(m.id + " ") and m.applied_at in line and m.needs in line for line in lines)
    assert "yes, of the reward model only" in out
    code, out, _ = run(capsys, "methods", "--json")
    listed = json.loads(out)
    assert [m["id"] for m in listed] == ALL
    assert {m["id"]: m["changes_weights"] for m in listed}["constrained"] == "no"


def test_no_weight_updates_for_structured_output(capsys):
    code, out, _ = run(capsys, "advise", "--no-weight-updates", "--goal", "structured-output", "--json")
    assert code == 0
    advice = json.loads(out)
    assert {"few_shot", "constrained"} <= set(advice["recommended"])
    assert set(advice["recommended"]) <= {"system_prompt", "few_shot", "constrained", "best_of_n"}
    for method_id in ("sft", "ppo", "dpo", "pretrain", "reward_model"):
        assert method_id in advice["ruled_out"]
        assert "no weight updates" in advice["reasons"][method_id]
    assert set(advice["recommended"]) | set(advice["ruled_out"]) == set(ALL)
    assert all(advice["reasons"][m] for m in ALL)
    code, text, _ = run(capsys, "advise", "--no-weight-updates", "--goal", "structured-output")
    assert "Recommended" in text and "Ruled out" in text and "constrained" in text


def test_preference_pairs_lead_through_the_reward_model():
    advice = advise.advise(goal="preference", have=["preferences"])
    assert advice.recommended == ["reward_model", "ppo", "dpo", "system_prompt", "best_of_n"]
    assert "from reward_model" in advice.reasons["ppo"] and "from reward_model" in advice.reasons["best_of_n"]
    assert set(advice.ruled_out) == {"pretrain", "sft", "few_shot", "constrained"}
    assert "does not serve preference" in advice.reasons["constrained"]


def test_without_weight_updates_a_reward_model_must_be_at_hand():
    advice = advise.advise(no_weight_updates=True, goal="preference", have=["preferences"])
    assert advice.recommended == ["system_prompt"]
    assert "reward_model" in advice.reasons["best_of_n"] and "not recommended" in advice.reasons["best_of_n"]
    advice = advise.advise(no_weight_updates=True, goal="preference", have=["reward_model"])
    assert advice.recommended == ["system_prompt", "best_of_n"]
    assert "your reward model" in advice.reasons["best_of_n"]


@pytest.mark.parametrize("goal, have, recommended", [
    ("instruction-following", ["raw_text"], ["system_prompt"]),
    ("instruction-following", ["instructions"], ["sft", "system_prompt", "few_shot"]),
    ("structured-output", ["schema"], ["system_prompt", "constrained"]),
    ("structured-output", ["demonstrations", "schema"], ["system_prompt", "few_shot", "constrained"]),
    (None, ["raw_text"], ["pretrain", "system_prompt"]),
    (None, None, ALL),
])
def test_data_at_hand_decides(goal, have, recommended):
    advice = advise.advise(goal=goal, have=have)
    assert advice.recommended == recommended
    assert sorted(advice.ruled_out) == sorted(set(ALL) - set(recommended))
    for method_id in advice.ruled_out:
        if goal is None or goal in dict(methods.get(method_id).serves):
            assert "--have does not list" in advice.reasons[method_id]


def test_advice_follows_the_catalogue_not_a_table(monkeypatch):
    # Reclassify constrained as changing weights: the same question now rules it out.
    changed = dict(methods.CATALOGUE, constrained=replace(methods.get("constrained"), changes_weights="yes"))
    monkeypatch.setattr(methods, "CATALOGUE", changed)
    advice = advise.advise(no_weight_updates=True, goal="structured-output")
    assert "constrained" in advice.ruled_out and "few_shot" in advice.recommended


def test_bad_goal_or_data_kind_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["advise", "--goal", "speed"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["advise", "--have", "vibes"])
    assert e.value.code == 2
