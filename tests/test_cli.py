"""The command line: bad input gives one clear line and exit code 2, never a traceback."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "stagewise", *args], capture_output=True, text=True)


def test_data_prints_counts_per_file(tmp_path):
    result = run("data", "--out", str(tmp_path / "w"), "--preset", "smoke")
    assert result.returncode == 0, result.stderr
    for name in ("pretrain.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl", "eval.jsonl",
                 "heldout_text.jsonl"):
        assert name in result.stdout and (tmp_path / "w" / name).is_file()
    assert "tokens" in result.stdout and "annotator agreement" in result.stdout


def test_unknown_config_key_is_refused_cleanly(tmp_path):
    result = run("data", "--out", str(tmp_path / "w"), "--preset", "smoke", "n_sfft=3")
    assert result.returncode == 2
    assert "unknown key 'n_sfft'" in result.stderr and "n_sft" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()
