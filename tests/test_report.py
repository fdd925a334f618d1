"""The run report: both files, every section, escaped answers, embedded images, missing inputs.

A fake run directory with small synthetic metrics stands in for a real run, so these take seconds.
"""

import json
import re
import shutil

import pytest

from stagewise import report

HEADINGS = ("What this run did", "The seed example", "Models and metrics", "Plots", "Methods and lineage",
            "Timings", "Machine", "Example answers")
BASE_ANSWER = "Le chat <b>noir</b> & the dog\nkept going"
SFT_ANSWER = "le chat noir"


def lm_metrics(following: float, **extra) -> dict:
    return {"heldout_loss": 2.34567, "instruction_following": following, "continuation_rate": 1 - following,
            "per_task": {"arithmetic": following, "facts": 0.5}, "gold_reward": following / 2,
            "format_valid": 0.75, "stop_rate": 0.9, "weights_unchanged": True, "prompt_format": "chat",
            "methods": [], "n_prompts": 48, "seed_example": {"prompt": "p", "response": "r"},
            "examples": [{"task": "facts", "prompt": f"Q{i}?", "response": f"A{i} | x"} for i in range(5)],
            "eval_seconds": 1.5, **extra}


def make_summary() -> dict:
    models = {
        "base": lm_metrics(0.12345, prompt_format="raw"),
        "base+few_shot": lm_metrics(0.3, prompt_format="raw", methods=["few_shot"]),
        "sft": lm_metrics(0.6),
        "sft+constrained": lm_metrics(0.62, methods=["constrained"]),
        "sft+best_of_n": lm_metrics(0.65, methods=["best_of_n"], n_prompts=12, n=8,
                                    sft_gold_reward_same_prompts=0.4321),
        "ppo": lm_metrics(0.64, win_rate_vs_sft=0.55, kl_to_sft=0.8),
        "dpo": lm_metrics(0.66, win_rate_vs_sft=0.58, kl_to_sft=0.3),
        "reward_model": {"pairwise_accuracy": 0.8766, "heldout_pairs": 200},
    }
    models["base"].pop("gold_reward")
    return {"preset": "smoke", "models": models,
            "seconds": {"data": 1.0, "pretrain": 30.0, "sft": 10.0, "reward": 5.0, "ppo": 8.0, "dpo": 4.0,
                        "eval": 12.0, "total": 70.0},
            "seed_example": {"prompt": "Translate to French: the black cat", "base": BASE_ANSWER, "sft": SFT_ANSWER},
            "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "platform": "Linux",
                        "python": "3.11", "torch": "2.0", "gpu": None}}


def lineage(*methods: str) -> list[dict]:
    return [{"method": m, "stage": "s", "family": "f", "applied_at": "training", "changes_weights": True,
             "parent": None, "data_sha256": "d", "config": {}, "metrics": {"loss": 1.23456, "seconds": 3.0},
             "weights_sha256": f"{m}hash0123456789abcdef", "started": "t0", "finished": "t1"} for m in methods]


def make_run(root):
    """A run directory like `stagewise run` leaves it, with a few lines of metrics per stage."""
    def jsonl(name, rows):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sh')

    steps = range(1, 6)
    jsonl("base", [{"step": s, "loss": 5 - s / 2, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01} for s in steps]
          + [{"step": 5, "heldout_loss": 3.0}, {"step": 5, "heldout_loss": 2.9, "fact_cloze": 0.1}])
    jsonl("sft", [{"step": s, "loss": 3 - s / 3, "lr": 1e-4} for s in steps] + [{"step": 5, "validation_loss": 1.5}])
    jsonl("reward", [{"step": s, "loss": 0.7 - s / 20, "accuracy": 0.5 + s / 20, "margin": s / 10} for s in steps]
          + [{"step": 5, "pairwise_accuracy": 0.8}])
    jsonl("dpo", [{"step": s, "lr": 1e-5, "loss": 0.69 - s / 50, "rewards/chosen": 0.1, "rewards/rejected": -0.1,
                   "rewards/margins": s / 10, "rewards/accuracies": 0.6} for s in steps] + [{"steps": 5, "seconds": 2}])
    jsonl("ppo", [{"iteration": s, "objective/kl": s / 10, "objective/scores": 0.1 * s, "gold/score": 0.3,
                   "objective/rlhf_reward": 0.1} for s in steps] + [{"iterations": 5, "seconds": 3}])
    (root / "ppo" / "overoptimisation.csv").write_text(
        "iteration,kl,sqrt_kl,proxy_score,gold_score\n" + "".join(f"{s},{s / 10},{(s / 10) ** 0.5},{s / 5},0.3\n"
                                                                  for s in steps))
    chains = {"base": ("pretrain",), "sft": ("pretrain", "sft"), "reward": ("pretrain", "sft", "reward_model"),
              "ppo": ("pretrain", "sft", "ppo"), "dpo": ("pretrain", "sft", "dpo")}
    for name, chain in chains.items():
        (root / name / "lineage.json").write_text(json.dumps(lineage(*chain)))
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = make_run(tmp_path_factory.mktemp("run"))
    report.write(out, make_summary())
    return out, (out / "report.md").read_text(), (out / "report.html").read_text()


def table_row(markdown: str, first_cell: str) -> list[str]:
    """The cells of the first Markdown table row that starts with `first_cell`."""
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def test_both_files_hold_every_section_in_order(full_run):
    _, md, page = full_run
    for text in (md, page):
        positions = [text.index(h) for h in HEADINGS]
        assert positions == sorted(positions)


def test_seed_answers_appear_escaped(full_run):
    _, md, page = full_run
    escaped = "Le chat &lt;b&gt;noir&lt;/b&gt; &amp; the dog<br>kept going"
    assert escaped in page and escaped in md
    assert "<b>noir" not in page
    assert SFT_ANSWER in page and "Model A" in page and "Model B" in page
    assert "Translate to French: the black cat" in page


def test_html_is_self_contained(full_run):
    out, md, page = full_run
    assert page.count("data:image/png;base64,") >= 4
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", page)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    for path in re.findall(r"\]\((report/[^)]+\.png)\)", md):
        assert (out / path).is_file()
    assert len(re.findall(r"\]\((report/[^)]+\.png)\)", md)) == 7  # 5 stages, overoptimisation, models


def test_metrics_table_rounds_to_three_decimals_and_leaves_missing_blank(full_run):
    _, md, _ = full_run
    header = table_row(md, "model")
    base = dict(zip(header, table_row(md, "base")))
    assert base["instruction_following"] == "0.123"
    assert base["gold_reward"] == "" and base["kl_to_sft"] == "" and base["pairwise_accuracy"] == ""
    assert base["weights_unchanged"] == "yes" and base["prompt format"] == "raw"
    reward = dict(zip(header, table_row(md, "reward_model")))
    assert reward["pairwise_accuracy"] == "0.877" and reward["instruction_following"] == ""
    assert dict(zip(header, table_row(md, "ppo")))["kl_to_sft"] == "0.800"
    assert "0.432" in md  # sft_gold_reward_same_prompts beside best-of-n


def test_catalogue_lineage_and_timings(full_run):
    _, md, _ = full_run
    assert table_row(md, "best_of_n")[3] == "inference"
    assert "dpohash01234" in md and "loss 1.235" in md
    # the metrics table, then the inference-time methods applied in evaluation
    assert "| sft+best_of_n | sft/ (sft, sfthash01234) | best_of_n (inference) | yes |" in md
    assert table_row(md, "total")[1] == "70.0"
    assert table_row(md, "cpu")[1] == "Test CPU"


def test_missing_inputs_leave_a_shorter_report(tmp_path):
    out = make_run(tmp_path)
    shutil.rmtree(out / "ppo")
    (out / "dpo" / "metrics.jsonl").unlink()
    summary = make_summary()
    del summary["machine"], summary["models"]["ppo"], summary["seconds"]["total"]
    summary["models"]["sft"] = {}
    report.write(out, summary)
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert all(h in md and h in page for h in HEADINGS)
    assert page.count("data:image/png;base64,") == 4  # pretrain, sft, reward, models
    assert "| 70.0 |" in md  # the total summed from the stages


def test_an_empty_run_still_gets_a_report(tmp_path):
    report.write(tmp_path, {})
    assert all(h in (tmp_path / "report.html").read_text() for h in HEADINGS)
