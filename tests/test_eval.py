"""The eval harness and diagnose on tiny models: metric names, prompt formats, lineage."""

import json
import shutil
import subprocess
import sys

import pytest

from stagewise.eval import score_responses
from stagewise.world import tasks


def test_scores_from_hand_written_responses():
    records = [{"task": "arithmetic", "prompt": "What is 2 + 3?", "reference": "2 + 3 = 5."},
               {"task": "arithmetic", "prompt": "What is 4 + 4?", "reference": "4 + 4 = 8."},
               {"task": "json_record", "prompt": "x", "reference": '{"name": "Lola"}'},
               {"task": "word_ops", "prompt": "y", "reference": "3"}]
    responses = ["2 + 3 = 5.", "\nbob: I have the same homework", 'Here: {"name": "Lola"}', "4"]
    scores = score_responses(records, responses, judge=lambda p, r: 0.5)
    assert scores["per_task"] == {"arithmetic": 0.5, "json_record": 1.0, "word_ops": 0.0}
    assert scores["instruction_following"] == 0.5
    assert scores["continuation_rate"] == 0.25  # only the forum chatter continued the text
    assert scores["format_valid"] == 0.0 and scores["gold_reward"] == 0.5


def run(*args):
    return subprocess.run([sys.executable, "-m", "stagewise", *args], capture_output=True, text=True)


def test_eval_json_for_a_base_and_a_chat_model(smoke_base, smoke_sft):
    for model, fmt in ((smoke_base, "raw"), (smoke_sft, "chat")):
        result = run("eval", "--model", str(model), "--preset", "smoke", "--json")
        assert result.returncode == 0, result.stderr
        metrics = json.loads(result.stdout)
        assert metrics["prompt_format"] == fmt
        for key in ("heldout_loss", "instruction_following", "continuation_rate", "per_task", "gold_reward",
                    "format_valid"):
            assert key in metrics
        assert set(metrics["per_task"]) == set(tasks.TASKS)
        assert 0 <= metrics["instruction_following"] <= 1 and metrics["heldout_loss"] > 0


def test_diagnose_reads_lineage_and_works_without_it(smoke_base, smoke_sft, tmp_path):
    result = run("diagnose", "--model", str(smoke_base), "--model", str(smoke_sft), "--preset", "smoke", "--json")
    assert result.returncode == 0, result.stderr
    base, chat = json.loads(result.stdout)
    assert base["lineage"]["methods"] == ["pretrain"] and chat["lineage"]["methods"] == ["pretrain", "sft"]
    assert base["lineage"]["label"] == "pre-trained only" and chat["lineage"]["label"] == "instruction-aligned"
    assert base["behaviour"]["label"] in ("not pre-trained", "pre-trained only", "instruction-aligned")
    bare = tmp_path / "bare"
    shutil.copytree(smoke_sft, bare)
    (bare / "lineage.json").unlink()
    result = run("diagnose", "--model", str(bare), "--preset", "smoke", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lineage"] is None and report["agrees"] is None and report["next"]["method"]


@pytest.mark.parametrize("verb", ["eval", "diagnose"])
def test_not_a_model_directory(verb, tmp_path):
    result = run(verb, "--model", str(tmp_path / "nope"), "--preset", "smoke")
    assert result.returncode == 2 and "no such model directory" in result.stderr


def test_demonstrations_that_fill_the_context_are_left_out_first_ones_first(smoke_sft):
    from stagewise.eval import generate_answers
    from stagewise.model_dir import load_language_model

    model, tokenizer, _ = load_language_model(smoke_sft)
    long_demo = [{"role": "user", "content": "Count the words: " + "cat " * 60},
                 {"role": "assistant", "content": "60"}]
    short_demo = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}]
    (_, ids, _, _), = generate_answers(model, tokenizer, ["What is 4 + 4?"], chat=True, max_new_tokens=8,
                                       demonstrations=[long_demo, long_demo, long_demo, short_demo])
    assert len(ids) + 8 <= model.cfg.max_seq_len
    assert "2 + 3 = 5." in tokenizer.decode(ids)  # the last demonstration is kept


def test_the_annotator_judges_a_subset_of_the_world_prompts_but_not_user_prompts(smoke_sft, smoke_config):
    from stagewise.eval import evaluate_model
    from stagewise.model_dir import load_language_model
    from stagewise.stages import common, sft

    model, tokenizer, lineage = load_language_model(smoke_sft)
    world = smoke_config(sft.SFTConfig, "sft").world
    subset = common.world_data(world)["eval"][::10]
    assert evaluate_model(model, tokenizer, lineage, world=world, eval_records=subset)["gold_reward"] is not None
    user = [dict(r, prompt=r["prompt"] + " Please.") for r in subset]
    assert evaluate_model(model, tokenizer, lineage, world=world, eval_records=user)["gold_reward"] is None


def test_the_sft_model_of_a_lineage_is_the_parent_of_its_first_preference_stage():
    from pathlib import Path

    from stagewise.eval import sft_parent
    entries = [{"method": "pretrain", "parent": None}, {"method": "sft", "parent": "base"},
               {"method": "ppo", "parent": "sft"}, {"method": "dpo", "parent": "ppo"}]
    assert sft_parent(entries) == Path("sft")
    assert sft_parent(entries[:3]) == Path("sft")
    assert sft_parent(entries[:2]) is None and sft_parent(None) is None


def test_sampled_answers_are_drawn_several_times_per_prompt_and_compared_draw_by_draw(smoke_sft, smoke_config):
    from stagewise.errors import StagewiseError
    from stagewise.eval import SAMPLES_PER_PROMPT, evaluate_model, win_rate
    from stagewise.model_dir import load_language_model
    from stagewise.stages import common, sft

    model, tokenizer, lineage = load_language_model(smoke_sft)
    world = smoke_config(sft.SFTConfig, "sft").world
    subset = common.world_data(world)["eval"][::10]
    metrics = evaluate_model(model, tokenizer, lineage, world=world, eval_records=subset, sample=True)
    scores = metrics["gold_scores_sampled"]
    assert SAMPLES_PER_PROMPT > 1 and len(scores) == SAMPLES_PER_PROMPT * len(subset)
    assert metrics["gold_reward_sampled"] == pytest.approx(sum(scores) / len(scores))
    # The same draws compared with themselves tie everywhere; a model better on one draw of one
    # prompt wins that draw only.
    assert win_rate(scores, scores) == 0.5
    better = scores[:]
    better[0] += 1.0
    assert win_rate(better, scores) == pytest.approx(0.5 + 0.5 / len(scores))
    with pytest.raises(StagewiseError, match="baseline"):
        win_rate(scores, scores[:len(subset)])


def test_answer_logprobs_keep_the_answers_order_and_kl_to_is_their_mean_difference(smoke_base, smoke_sft):
    import torch

    from stagewise import engine
    from stagewise.eval import answer_logprobs, generate_answers, kl_to
    from stagewise.model_dir import load_language_model
    sft, tokenizer, _ = load_language_model(smoke_sft)
    base, _, _ = load_language_model(smoke_base)
    prompts = ["What is 2 + 3?", "Translate the following sentence into French: Hello.", "Name a city."] * 3
    answers = generate_answers(sft, tokenizer, prompts, chat=True, max_new_tokens=12, temperature=1.0, seed=3)
    prompt_ids, responses = [a[1] for a in answers], [a[2] for a in answers]
    assert len({len(r) for r in responses}) > 1  # lengths differ, so the batches are reordered
    one_by_one = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, responses):
            logp, mask = engine.sequence_logprobs(sft, [p], [r])
            one_by_one.append((logp * mask).sum().item())
    got = answer_logprobs(sft, prompt_ids, responses, batch_size=4)
    assert got == pytest.approx(one_by_one, abs=1e-4)
    assert kl_to(sft, sft, answers) == pytest.approx(0.0, abs=1e-6)
    base_logprobs = answer_logprobs(base, prompt_ids, responses)
    expected = sum(a - b for a, b in zip(one_by_one, base_logprobs)) / len(answers)
    assert kl_to(sft, base, answers) == pytest.approx(expected, abs=1e-3) and expected > 0
