"""SFT end to end on a tiny model, and the loss mask on exactly the assistant's tokens."""

import json
import subprocess
import sys

from stagewise.batching import ExampleBatches
from stagewise.model import weights_sha256
from stagewise.model_dir import load_model_dir
from stagewise.stages import sft


def test_loss_is_taken_on_the_assistant_tokens_only(smoke_base):
    _, tokenizer, _ = load_model_dir(smoke_base)
    conversation = {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 2 + 3?"},
                                 {"role": "assistant", "content": "2 + 3 = 5."},
                                 {"role": "user", "content": "And 1 + 1?"},
                                 {"role": "assistant", "content": "1 + 1 = 2."}]}
    (example,) = sft.encode(tokenizer, [conversation], 256, "test")
    x, y = ExampleBatches([example], 1, 0, tokenizer.pad_id).next()
    trained = [int(t) for t in y[0] if t != -100]
    assert tokenizer.decode(trained) == "2 + 3 = 5.<|im_end|>1 + 1 = 2.<|im_end|>"
    # each target is the token that follows its input position
    ids = x[0].tolist()
    for t, target in enumerate(y[0].tolist()):
        if target != -100:
            assert ids[t + 1] == target


def test_sft_lowers_the_loss_and_extends_the_lineage(smoke_base, smoke_sft):
    base, _, _ = load_model_dir(smoke_base)
    model, _, lineage = load_model_dir(smoke_sft)
    assert [e["method"] for e in lineage] == ["pretrain", "sft"]
    assert lineage[1]["parent"] == str(smoke_base) and lineage[1]["stage"] == "alignment"
    assert lineage[1]["family"] == "instruction alignment"
    assert lineage[1]["weights_sha256"] == weights_sha256(model) != weights_sha256(base)
    assert model.cfg == base.cfg  # inherited
    losses = [json.loads(line)["loss"] for line in (smoke_sft / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]


def test_user_conversations_in_trl_formats(smoke_base, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"Say {i}.", "completion": f"{i}."} for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 10
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = subprocess.run([sys.executable, "-m", "stagewise", "sft", "--preset", "smoke", "--from", str(smoke_base),
                             "--data", str(path), "--out", str(tmp_path / "m"), "max_steps=3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "50 conversations" in result.stdout and "0 replayed" in result.stdout


def test_a_parent_that_is_not_a_model_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "stagewise", "sft", "--preset", "smoke", "--from",
                             str(tmp_path / "empty"), "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert result.returncode == 2 and "missing config.json" in result.stderr
    assert not (tmp_path / "m").exists()
