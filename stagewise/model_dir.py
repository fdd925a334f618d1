"""Model directories: how stages hand a model to the next stage.

A model directory holds everything needed to run or continue from a model, in transformers'
layout so `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
load it too:

    config.json              LlamaConfig (from ModelConfig.to_hf_config)
    model.safetensors        fp32 weights under transformers' Llama names
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    generation_config.json   eos_token_id lists <|im_end|> and <|endoftext|>
    lineage.json             the stages that produced this model, oldest first

The files are written whole into a temporary sibling first. A new directory is renamed into
place; into an existing one (an older model, or the working directory of a stage with its
checkpoints and metrics) the files are moved one by one with `lineage.json` last, so a crash
never leaves a directory that looks complete but is not.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stagewise.errors import StagewiseError
from stagewise.model import ModelConfig, Transformer
from stagewise.reward_model import ARCHITECTURE as REWARD_ARCHITECTURE
from stagewise.reward_model import RewardModel
from stagewise.tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": Transformer, REWARD_ARCHITECTURE: RewardModel}
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json", "lineage.json")


def is_model_dir(path: str | Path) -> bool:
    """True when `path` is a directory holding every file of a model directory."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)


def _is_working_dir(path: Path) -> bool:
    """An empty directory, or one a stage is training into (it holds `train_state/`)."""
    return path.is_dir() and (not any(path.iterdir()) or (path / "train_state").is_dir())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StagewiseError(f"{path}: unreadable or not valid JSON ({e})") from None


def save_model_dir(path: str | Path, model: torch.nn.Module, tokenizer: Tokenizer, lineage: list[dict],
                   generation_config: dict | None = None, config_extra: dict | None = None) -> Path:
    """Write a model directory at `path`, replacing an existing model directory there.

    model: a Transformer, or any module with a `cfg` ModelConfig and transformers-named
    parameters (the reward model). generation_config: extra generation_config.json keys (e.g.
    temperature), merged over the default token ids. config_extra: keys merged over config.json
    (e.g. another `architectures`). Returns the path.
    """
    path = Path(path)
    model = getattr(model, "_orig_mod", model)  # accept a torch.compile'd model
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise StagewiseError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    if path.exists() and not (is_model_dir(path) or _is_working_dir(path)):
        raise StagewiseError(f"{path}: exists and is not a model directory; refusing to replace it")
    try:
        lineage_json = json.dumps(list(lineage), indent=2) + "\n"
    except TypeError as e:
        raise StagewiseError(f"{path}: lineage must be JSON-serialisable ({e})") from None

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        eos = [tokenizer.im_end_id, tokenizer.endoftext_id]
        _write_json(tmp / "config.json",
                    {**cfg.to_hf_config(tokenizer.endoftext_id, eos, tokenizer.pad_id), **(config_extra or {})})
        state = model.state_dict()
        if cfg.tie_embeddings:
            # One stored copy; transformers re-ties lm_head from tie_word_embeddings.
            state.pop("lm_head.weight", None)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp, model_max_length=cfg.max_seq_len)
        gen = {"bos_token_id": tokenizer.endoftext_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_id}
        _write_json(tmp / "generation_config.json", {**gen, **(generation_config or {})})
        (tmp / "lineage.json").write_text(lineage_json)
        for f in tmp.iterdir():  # on disk before the rename makes the directory visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
        return path
    # Into an existing directory (a previous model, or a stage's working directory holding its
    # checkpoints and metrics), file by file. lineage.json goes first and comes back last, so
    # until every file is in place the directory does not look like a model directory.
    (path / "lineage.json").unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "lineage.json"):
        os.replace(f, path / f.name)
    tmp.rmdir()
    return path


def load_model_dir(path: str | Path, require_lineage: bool = True) -> tuple[Transformer | RewardModel, Tokenizer, list[dict] | None]:
    """Read a model directory: (model in fp32 on CPU, tokenizer, lineage). The model is a
    Transformer, or a RewardModel when config.json names a sequence classifier. With
    require_lineage=False a directory without lineage.json (one written by another tool) loads
    too, with lineage None."""
    path = Path(path)
    if not path.exists():
        raise StagewiseError(f"{path}: no such model directory")
    if not path.is_dir():
        raise StagewiseError(f"{path}: not a directory; expected a model directory")
    for f in REQUIRED_FILES:
        if f == "lineage.json" and not require_lineage:
            continue
        if not (path / f).is_file():
            raise StagewiseError(f"{path}: missing {f}; not a complete model directory")

    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise StagewiseError(f"{path / 'config.json'}: expected a JSON object")
    try:
        cfg = ModelConfig.from_hf_config(config)
    except StagewiseError as e:
        raise StagewiseError(f"{path}: {e}") from None
    _read_json(path / "tokenizer_config.json")
    _read_json(path / "generation_config.json")
    lineage = _read_json(path / "lineage.json") if (path / "lineage.json").is_file() else None
    if lineage is not None and not isinstance(lineage, list):
        raise StagewiseError(f"{path / 'lineage.json'}: expected a JSON list")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise StagewiseError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but config.json vocab_size is {cfg.vocab_size}")

    weights = path / "model.safetensors"
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise StagewiseError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    architecture = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if architecture not in ARCHITECTURES:
        raise StagewiseError(f"{path / 'config.json'}: architecture {architecture!r} is not one of "
                             f"{', '.join(ARCHITECTURES)}")
    try:
        model = (RewardModel(cfg, likelihood=config.get("likelihood_reward") is True)
                 if architecture == REWARD_ARCHITECTURE else ARCHITECTURES[architecture](cfg))
    except StagewiseError as e:
        raise StagewiseError(f"{path / 'config.json'}: {e}") from None
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # a tied copy some writers store; the embedding wins
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise StagewiseError(f"{weights}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})")
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    except RuntimeError as e:
        raise StagewiseError(f"{weights}: weight shapes do not match config.json ({e})") from None
    return model, tokenizer, lineage


def load_language_model(path: str | Path) -> tuple[Transformer, Tokenizer, list[dict]]:
    """A model directory that must hold a language model (not a reward model)."""
    model, tokenizer, lineage = load_model_dir(path)
    if not isinstance(model, Transformer):
        raise StagewiseError(f"{path}: is a reward model; expected a language model directory")
    return model, tokenizer, lineage


def load_reward_model(path: str | Path) -> tuple[RewardModel, Tokenizer, list[dict]]:
    """A model directory that must hold a reward model."""
    model, tokenizer, lineage = load_model_dir(path)
    if not isinstance(model, RewardModel):
        raise StagewiseError(f"{path}: is a language model; expected a reward model directory "
                             "(written by `stagewise reward`)")
    return model, tokenizer, lineage
