"""The assembled world: determinism, held-out reservations, coverage and the annotator's noise."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from stagewise import config
from stagewise.world import build, tasks
from stagewise.world.build import DataConfig


@pytest.fixture(scope="module")
def smoke():
    cfg = config.resolve(DataConfig, "data", "smoke", [])
    data, agreement = build.build(cfg)
    return cfg, data, agreement


def sft_prompts(data):
    return {m["content"] for r in data["sft"] for m in r["messages"] if m["role"] == "user"}


def test_data_command_is_byte_identical_for_a_seed(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "stagewise", "data", "--out", str(tmp_path / name), "--seed", "7",
                        "--preset", "smoke"], check=True, capture_output=True)
    for file in build.FILES:
        assert (tmp_path / "a" / f"{file}.jsonl").read_bytes() == (tmp_path / "b" / f"{file}.jsonl").read_bytes()
    subprocess.run([sys.executable, "-m", "stagewise", "data", "--out", str(tmp_path / "c"), "--seed", "8",
                    "--preset", "smoke"], check=True, capture_output=True)
    assert (tmp_path / "a" / "eval.jsonl").read_bytes() != (tmp_path / "c" / "eval.jsonl").read_bytes()


def test_data_command_writes_the_data_the_stages_train_on(tmp_path, smoke):
    """The stages rebuild the world in-process from the config's JSON (sorted keys); the files of
    `stagewise data` are built from the config as given. Mapping settings (task weights, corpus
    mix) must not draw differently in either order."""
    from stagewise.stages import common

    cfg, _, _ = smoke
    subprocess.run([sys.executable, "-m", "stagewise", "data", "--out", str(tmp_path), "--preset", "smoke"],
                   check=True, capture_output=True)
    stages = common.world_data(cfg)
    for file in build.FILES:
        written = [json.loads(line) for line in (tmp_path / f"{file}.jsonl").read_text().splitlines()]
        assert written == stages[file], file
    reordered = config.resolve(DataConfig, "data", "smoke", [])
    reordered.task_weights = dict(reversed(list(reordered.task_weights.items())))
    reordered.corpus_mix = dict(reversed(list(reordered.corpus_mix.items())))
    data = build.build(reordered)[0]
    assert data["sft"] == stages["sft"] and data["pretrain"] == stages["pretrain"]


def test_eval_prompts_absent_from_training_prompts(smoke):
    _, data, _ = smoke
    eval_prompts = {r["prompt"] for r in data["eval"]}
    training = sft_prompts(data) | {r["prompt"] for r in data["preferences"]} | {r["prompt"] for r in data["prompts"]}
    assert eval_prompts and not eval_prompts & training
    assert build.SEED_PROMPT in sft_prompts(data)  # the named probe, the one exception
    assert build.SEED_PROMPT not in eval_prompts


def test_sft_and_preference_prompts_are_disjoint(smoke):
    _, data, _ = smoke
    assert not sft_prompts(data) & {r["prompt"] for r in data["preferences"]}
    assert not sft_prompts(data) & {r["prompt"] for r in data["heldout_preferences"]}


def test_held_out_facts_are_only_in_pretraining(smoke):
    cfg, data, _ = smoke
    world = build.make_world(cfg)
    pretrain_text = "\n".join(r["text"] for r in data["pretrain"])
    training_text = json.dumps([data["sft"], data["preferences"], data["prompts"], data["heldout_preferences"]])
    facts = [r for r in data["eval"] if r["task"] == "facts"]
    assert facts
    for record in facts:
        assert record["reference"] in pretrain_text
        name = record["reference"].split()[0]
        assert name in world.heldout_names
        assert name not in training_text


def test_reserved_material_is_not_in_pretraining(smoke):
    _, data, _ = smoke
    pretrain_text = "\n".join(r["text"] for r in data["pretrain"])
    for record in data["eval"]:
        if record["task"] == "translate_en_fr":
            assert record["reference"] not in pretrain_text
        if record["task"] == "arithmetic":
            assert record["reference"] not in pretrain_text
        assert record["prompt"] not in pretrain_text


def test_every_family_in_sft_and_eval(smoke):
    cfg, data, _ = smoke
    world = build.make_world(cfg)
    people = world.people_by_name
    sft_tasks = Counter(tasks.solve(p, people).task for p in sft_prompts(data))
    eval_tasks = Counter(r["task"] for r in data["eval"])
    assert set(sft_tasks) == set(tasks.TASKS) == set(eval_tasks)
    for record in data["eval"]:  # references are the annotator's own ideal answers
        assert world.gold_score(record["prompt"], record["reference"]) == pytest.approx(1.0)


def test_pretraining_corpus_has_every_kind_of_document(smoke):
    _, data, _ = smoke
    text = "\n".join(r["text"] for r in data["pretrain"])
    for marker in ("English: ", "French: ", "Thread: ", " + ", '{"name": ', "Sorted: ", "lives in", "A day in "):
        assert marker in text


def test_corpus_mix_sets_the_token_share_of_each_kind_of_document():
    """Each generator's documents make up its weight's share of the corpus (relative to the sum
    of the weights, by approximate tokens); a kind weighted 0 is left out."""
    from random import Random

    from stagewise.world import corpus

    def share(mix: dict[str, float]) -> dict[str, float]:
        make = {kind: (lambda kind=kind: f"{kind} " * (3 + len(kind))) for kind in corpus.MIX}
        counts: Counter = Counter()
        for _, (kind, text) in zip(range(4000), corpus.documents(Random(0), make, mix)):
            counts[kind] += corpus.approx_tokens(text)
        return {kind: n / sum(counts.values()) for kind, n in counts.items()}

    default = share(corpus.MIX)
    assert set(default) == set(corpus.MIX)
    for kind, weight in corpus.MIX.items():
        assert default[kind] == pytest.approx(weight / sum(corpus.MIX.values()), abs=0.005)
    mix = {**corpus.MIX, "json_records": 0.2, "story": 0.0}
    more_records = share(mix)
    assert "story" not in more_records
    assert more_records["json_records"] == pytest.approx(0.2 / sum(mix.values()), abs=0.005)


def test_corpus_mix_is_a_data_setting_and_bad_kinds_or_weights_are_refused(smoke):
    from stagewise.errors import StagewiseError

    cfg = config.resolve(DataConfig, "data", "smoke", ["corpus_mix.json_records=0.2", "corpus_mix.story=0"])
    assert cfg.corpus_mix["json_records"] == 0.2 and cfg.corpus_mix["story"] == 0.0
    pretrain = [r["text"] for r in build.build(cfg)[0]["pretrain"]]
    default = [r["text"] for r in smoke[1]["pretrain"]]
    records = [sum(t.count("Record of ") for t in texts) for texts in (pretrain, default)]
    assert records[0] > 1.5 * records[1]
    assert not any(t.startswith("A day in ") for t in pretrain) and any(t.startswith("A day in ") for t in default)
    with pytest.raises(StagewiseError, match="override 'corpus_mix.poems=1': corpus_mix: unknown document kind 'poems'"):
        config.resolve(DataConfig, "data", None, ["corpus_mix.poems=1"])
    with pytest.raises(StagewiseError, match="weights must be 0 or more"):
        config.resolve(DataConfig, "data", None, ["corpus_mix.story=-1"])


def test_annotator_agreement_is_the_documented_rate(smoke):
    _, _, agreement = smoke
    print(f"annotator agreement: measured {agreement['measured']:.3f}, expected {agreement['expected']:.3f}")
    assert agreement["pairs"] > 500
    assert 0.95 <= agreement["expected"] <= 0.99  # "about 97 pairs in 100" (annotator docstring)
    assert abs(agreement["measured"] - agreement["expected"]) < 0.025


def test_sft_styles_follow_the_documented_mix():
    cfg = DataConfig(n_people=40, n_heldout_people=10, pretrain_tokens=1000, heldout_text_tokens=100, n_sft=6000,
                     n_preferences=10, n_heldout_preferences=5, n_ppo_prompts=5, n_eval_per_task=5)
    data, _ = build.build(cfg)
    world = build.make_world(cfg)
    counts = Counter()
    for record in data["sft"]:
        prompt, response = (m["content"] for m in record["messages"])
        example = tasks.solve(prompt, world.people_by_name)
        correct = tasks.check(example.task, example.reference, response)
        counts["wrong" if not correct else "ideal" if response == example.reference
               else "rambling" if "\n" in response else "informal"] += 1
    total = sum(counts.values())
    for style, share in build.SFT_STYLES.items():
        assert counts[style] / total == pytest.approx(share, abs=0.03), (style, counts)
