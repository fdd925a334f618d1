"""Model directories: round trip, safe replacement, and clear errors for broken directories."""

import json
import random
import re

import pytest
import torch

import stagewise.model_dir as model_dir
from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer
from stagewise.model_dir import REQUIRED_FILES, is_model_dir, load_model_dir, save_model_dir
from stagewise.tokenizer import train_tokenizer

TINY = dict(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=64)
LINEAGE = [{"stage": "pretrain", "weights_sha256": "abc", "config": {"lr": 0.001}}]


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "le chat est sur la table the cat sat on a mat".split()
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(6)) for _ in range(200)], 300)


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tok, tie):
    model = tiny_model(tie_embeddings=tie)
    path = save_model_dir(tmp_path / "m", model, tok, LINEAGE)
    assert is_model_dir(path)
    loaded, tok2, lineage = load_model_dir(path)
    assert loaded.cfg == model.cfg
    assert lineage == LINEAGE
    assert tok2.encode("le chat 12") == tok.encode("le chat 12")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    idx = torch.tensor([tok.encode("le chat est sur la table")])
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_config_and_generation_config(tmp_path, tok):
    save_model_dir(tmp_path / "m", tiny_model(), tok, [], generation_config={"temperature": 0.7})
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.im_end_id, tok.endoftext_id]
    assert (gen["pad_token_id"], gen["temperature"]) == (tok.pad_id, 0.7)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2


def test_save_replaces_an_existing_model_dir(tmp_path, tok):
    path = tmp_path / "m"
    save_model_dir(path, tiny_model(seed=0), tok, [{"stage": "a"}])
    new = tiny_model(seed=1)
    save_model_dir(path, new, tok, [{"stage": "b"}])
    loaded, _, lineage = load_model_dir(path)
    assert lineage == [{"stage": "b"}]
    assert torch.equal(loaded.model.embed_tokens.weight, new.model.embed_tokens.weight)
    assert siblings(path) == []  # no temporary copies left behind


def test_save_refuses_to_replace_other_directories(tmp_path, tok):
    path = tmp_path / "notes"
    path.mkdir()
    (path / "important.txt").write_text("keep me")
    with pytest.raises(StagewiseError, match="not a model directory"):
        save_model_dir(path, tiny_model(), tok, [])
    assert (path / "important.txt").read_text() == "keep me"


def test_a_failed_save_leaves_nothing_that_looks_valid(tmp_path, tok, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(model_dir, "save_file", crash)
    path = tmp_path / "m"
    with pytest.raises(OSError):
        save_model_dir(path, tiny_model(), tok, [])
    assert not path.exists() and siblings(path) == []


def test_a_failed_save_keeps_the_previous_model(tmp_path, tok, monkeypatch):
    path = tmp_path / "m"
    save_model_dir(path, tiny_model(), tok, [{"stage": "old"}])
    monkeypatch.setattr(model_dir, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_model_dir(path, tiny_model(seed=1), tok, [{"stage": "new"}])
    assert load_model_dir(path)[2] == [{"stage": "old"}]


@pytest.mark.parametrize("missing", REQUIRED_FILES)
def test_missing_file_raises_naming_path_and_file(tmp_path, tok, missing):
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [])
    (path / missing).unlink()
    assert not is_model_dir(path)
    with pytest.raises(StagewiseError, match=re.escape(str(path)) + ".*" + re.escape(missing)):
        load_model_dir(path)


def test_corrupt_safetensors_raises(tmp_path, tok):
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [])
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StagewiseError, match=re.escape(str(path / "model.safetensors"))):
        load_model_dir(path)


def test_weights_that_do_not_fit_the_config_raise(tmp_path, tok):
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [])
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StagewiseError, match="model.safetensors.*missing"):
        load_model_dir(path)


def test_corrupt_json_raises(tmp_path, tok):
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [])
    config = json.loads((path / "config.json").read_text())
    del config["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(StagewiseError, match=re.escape(str(path)) + ".*intermediate_size"):
        load_model_dir(path)
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [])
    (path / "lineage.json").write_text("[{")
    with pytest.raises(StagewiseError, match="lineage.json"):
        load_model_dir(path)


def test_not_a_directory_raises(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("hello")
    assert not is_model_dir(f)
    with pytest.raises(StagewiseError, match=re.escape(str(f)) + ".*not a directory"):
        load_model_dir(f)
    with pytest.raises(StagewiseError, match=re.escape(str(tmp_path / "absent"))):
        load_model_dir(tmp_path / "absent")
    with pytest.raises(StagewiseError, match="missing config.json"):
        load_model_dir(tmp_path)


def test_save_into_a_stage_working_directory_keeps_its_files(tmp_path, tok):
    path = tmp_path / "m"
    (path / "train_state").mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    save_model_dir(path, tiny_model(), tok, [{"stage": "a"}])
    assert is_model_dir(path) and (path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert siblings(path) == []


def test_a_directory_without_lineage_loads_when_lineage_is_optional(tmp_path, tok):
    path = save_model_dir(tmp_path / "m", tiny_model(), tok, [{"stage": "a"}])
    (path / "lineage.json").unlink()
    model, _, lineage = load_model_dir(path, require_lineage=False)
    assert lineage is None and model.cfg.vocab_size > 0
