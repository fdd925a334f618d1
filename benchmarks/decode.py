"""Generated tokens/s: stagewise's engine against transformers' `generate`, same model directory.

Greedy decoding of 128 new tokens from the same prompts, at batch 1 and batch 16, fp32 on
this machine's CPU. Both sides must produce the same tokens (checked). By default the model
directory is a freshly initialised model of the default preset's size (pass --model DIR for a
trained one); neither side stops early, so each generates exactly 128 tokens per prompt.

Stagewise runs as a user who wants fast decoding would: `engine.generate(..., compile=True)`,
whose decode step is compiled once per model shape (AOTInductor; see stagewise/fast_decode.py).
That one-off compile and each side's warm-up run happen before the timed rounds and are printed
apart; the timed rounds alternate the two sides in this one process.

    python benchmarks/decode.py [--model DIR] [--rounds 3] [--threads N]

--threads sets torch's thread count for both sides. On a machine whose cores are busy with other
work, multi-threaded decoding stalls on OpenMP barriers (every small operator waits for a thread
that has no core), which slows transformers far more than the compiled step, whose generated
loops are single-threaded by design; `--threads 1` gives the steadier comparison there.

The last line is the JSON object of SPEC section 6; its target is the batch-1 one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from stagewise import engine
from stagewise.model import Transformer
from stagewise.model_dir import load_model_dir, save_model_dir
from stagewise.stages import common, pretrain
from stagewise.tokenizer import train_tokenizer
from stagewise.world.build import DataConfig, build

NEW_TOKENS = 128


def default_model_dir(path: Path) -> Path:
    cfg = common.resolve(pretrain.PretrainConfig, "pretrain", SimpleNamespace(preset="default", overrides=[]))
    texts = [r["text"] for r in build(DataConfig(n_people=40, n_heldout_people=10, pretrain_tokens=200_000,
                                                 heldout_text_tokens=100, n_sft=10, n_preferences=10,
                                                 n_heldout_preferences=5, n_ppo_prompts=5,
                                                 n_eval_per_task=5))[0]["pretrain"]]
    torch.manual_seed(0)
    save_model_dir(path, Transformer(cfg.model), train_tokenizer(texts, cfg.model.vocab_size), [])
    return path


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    texts = ["Translate the following sentence into French: Hello, how are you?", "Malin lives in",
             "Phrase book: English to French\n\nEnglish: I eat the red apple.\nFrench:", "12 + 34 ="]
    return [tokenizer.encode(texts[i % len(texts)]) for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}")

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or default_model_dir(Path(tmp) / "model")
        ours, tokenizer, _ = load_model_dir(model_dir)
        peer = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ours.eval()
    peer.eval()

    def run_ours(prompts):
        return engine.generate(ours, prompts, max_new_tokens=NEW_TOKENS, compile=True)

    def run_peer(prompts):
        # Left padding, as transformers expects for batched generation with a decoder-only model.
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tokenizer.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        # No end-of-sequence token: transformers neither stops at one nor, as min_new_tokens would,
        # masks it out, so a trained model that ends a document goes on past it as ours does.
        with torch.inference_mode():
            out = peer.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                do_sample=False, pad_token_id=tokenizer.pad_id)
        return out[:, width:].tolist()

    results = {}
    for batch in (1, 16):
        prompts = prompts_for(tokenizer, batch)
        start = time.perf_counter()
        first = run_ours(prompts)  # compiles the decode step on first use for this batch kind
        print(f"batch {batch:>2}: stagewise compile + first call {time.perf_counter() - start:.1f} s (not timed)")
        assert first == run_peer(prompts), "stagewise and transformers generated different tokens"
        ours_time = peer_time = 0.0
        for _ in range(args.rounds):
            start = time.perf_counter()
            run_ours(prompts)
            ours_time += time.perf_counter() - start
            start = time.perf_counter()
            run_peer(prompts)
            peer_time += time.perf_counter() - start
        tokens = args.rounds * batch * NEW_TOKENS
        results[batch] = (tokens / ours_time, tokens / peer_time)
        print(f"batch {batch:>2}: stagewise {tokens / ours_time:>8,.0f} tokens/s, transformers "
              f"{tokens / peer_time:>8,.0f} tokens/s, ratio {peer_time / ours_time:.2f}")

    ours_1, peer_1 = results[1]
    ours_16, peer_16 = results[16]
    print(json.dumps({"benchmark": "decode", "ours": round(ours_1), "peer": round(peer_1), "unit": "tokens/s",
                      "ratio": round(ours_1 / peer_1, 3), "target": 5.0, "batch": 1, "threads": torch.get_num_threads(),
                      "peer_name": "transformers generate",
                      "batch16": {"ours": round(ours_16), "peer": round(peer_16),
                                  "ratio": round(ours_16 / peer_16, 3), "target": 2.0}}))


if __name__ == "__main__":
    main()
