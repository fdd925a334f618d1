"""`stagewise run` end to end on the smoke preset: summary, report, and resume after a kill."""

import io
import json
import signal
import subprocess
import sys
import time

import pytest

from stagewise.run import EVALUATIONS, EXPECTED_SECONDS, STAGES, Display


def run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stagewise", "run", "--preset", "smoke", *args],
                          capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    result = run("--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_summary_has_every_model_and_stage(smoke_run):
    out, result = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == set(EVALUATIONS)
    for name in ("base", "base+few_shot", "sft", "sft+constrained", "sft+best_of_n", "ppo", "dpo"):
        metrics = summary["models"][name]
        for key in ("instruction_following", "continuation_rate", "per_task", "gold_reward", "heldout_loss",
                    "weights_unchanged"):
            assert key in metrics, (name, key)
        assert metrics["weights_unchanged"] is True
    for name in ("ppo", "dpo"):
        assert 0 <= summary["models"][name]["win_rate_vs_sft"] <= 1 and "kl_to_sft" in summary["models"][name]
    assert summary["models"]["sft+constrained"]["format_valid"] == 1.0
    assert 0 <= summary["models"]["reward_model"]["pairwise_accuracy"] <= 1
    assert set(STAGES) <= set(summary["seconds"]) and summary["seconds"]["total"] > 0
    assert summary["seed_example"]["prompt"].startswith("Translate the following sentence into French")
    assert {"base", "sft"} <= set(summary["seed_example"])
    print(f"smoke pipeline: {summary['seconds']['total']:.0f} s of stage time")
    # one display line per stage start and end, not the stages' own progress lines
    assert "[8/8] report done" in result.stdout and "pretrain     " not in result.stdout
    assert (out / "logs" / "pretrain.log").read_text().strip()


def test_report_shows_every_section_offline(smoke_run):
    out, _ = smoke_run
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    for text in (html, markdown):
        for heading in ("seed example", "metric", "catalogue", "Timings", "Machine"):
            assert heading.lower() in text.lower(), heading
    assert html.count("data:image/png;base64,") >= 4
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_rerunning_into_a_finished_directory_is_refused(smoke_run):
    out, _ = smoke_run
    result = run("--out", str(out))
    assert result.returncode == 2 and "--resume" in result.stderr


def test_a_kill_during_training_then_resume_finishes_the_run(tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stagewise", "run", "--preset", "smoke", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((out / "sft" / "train_state").glob("step_*.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "sft" / "lineage.json").exists(), "SFT finished before it could be killed"
    base_lineage = (out / "base" / "lineage.json").read_text()
    result = run("--out", str(out), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "base" / "lineage.json").read_text() == base_lineage  # pre-training was not redone
    assert "resumed at step" in (out / "logs" / "sft.log").read_text()
    assert json.loads((out / "summary.json").read_text())["models"]["dpo"]


def test_time_left_during_the_evaluations_counts_the_evaluations_still_to_run(tmp_path):
    stream = io.StringIO()
    display = Display(tmp_path, scale=1.0, stream=stream)
    display.begin(STAGES.index("eval") + 1, "eval")
    display.last_print = 0.0  # let the next line through
    display.progress("eval", 4, 8, 0.5, float("nan"), "4/8 sft")
    left = EXPECTED_SECONDS["eval"] * 0.5 + EXPECTED_SECONDS["report"]
    assert f"~{int(left) // 60}m{int(left) % 60:02d}s left" in stream.getvalue().splitlines()[-1]
