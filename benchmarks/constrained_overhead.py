"""Generated tokens/s with constrained decoding (a JSON schema) against unconstrained decoding.

The same model, the same prompts, greedy decoding, in one run, at batch 1 and batch 16: the
peer is stagewise's engine with no logits processor, ours is the same engine with
`constrained.ConstrainedDecoding` masking every step with llguidance. The ratio is what the
constraint costs per token (1.0 is free).

Fairness: both sides are measured in generated tokens per second, counting the tokens each row
really produced, and both generate the same number of tokens after the same prefill. The
constraint (the json_record schema of `world.tasks.json_schema(["name", "city", "age"])`) ends
a row when its record is complete, which an untrained model reaches in a few dozen tokens, so
the unconstrained side, which has no stop token, is given as many new tokens as the longest
constrained row produced (at most 128): otherwise its prefill would be spread over more tokens
and the ratio would charge the prompt's cost to the constraint. The constrained time includes
making each request's matchers (copies of the compiled grammar); building the llguidance
tokenizer and compiling the schema happen once per tokenizer and schema, in the warm-up.
Each round runs both sides back to back (which goes first alternates). On a shared CPU other
work slows rounds at random, by up to several times and not both sides of a round alike, so the
figures are medians over the quietest quarter of the rounds (those whose two sides took the
least time together: chosen on both sides at once, so the choice favours neither), and the
median ratio over all rounds is printed beside them. `mask_us_per_step` is the constraint's own cost, measured apart
from the model by replaying the constrained tokens: it does not depend on the load.

    python benchmarks/constrained_overhead.py [--model DIR] [--rounds 20]

By default the model is a freshly initialised one of the default preset's size (d128, 4
layers, vocab 1024) with a tokenizer trained on the embedded world's text. The last line is the
JSON object of SPEC section 6; its target is the batch-1 ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from stagewise import constrained, engine
from stagewise.model_dir import load_model_dir
from stagewise.world import tasks

sys.path.insert(0, str(Path(__file__).parent))
from decode import default_model_dir  # noqa: E402  (the same quickly built default-size model)

NEW_TOKENS = 128
KEYS = ["name", "city", "age"]
NAMES = ["Malin", "Yves", "Lena", "Hugo", "Ines", "Noah", "Chloe", "Omar"]


def prompts_for(tokenizer, batch: int) -> list[list[int]]:
    texts = [tasks.TEMPLATES["json_record"][i % 2].format(name=NAMES[i % len(NAMES)], keys="name, city and age")
             for i in range(batch)]
    return [[tokenizer.endoftext_id] + tokenizer.encode(t) for t in texts]


def replay_us_per_step(tokenizer, schema, vocab_size: int, stop_id: int, outs: list[list[int]]) -> float:
    """The constraint's own cost, free of the model and of other load: microseconds per decoding
    step of the logits processor, replaying the tokens the constrained run chose (best of 5)."""
    steps = max(map(len, outs))
    logits = torch.zeros(len(outs), vocab_size)
    best = float("inf")
    for _ in range(5):
        processor = constrained.ConstrainedDecoding(tokenizer, schema, len(outs), vocab_size=vocab_size,
                                                    stop_id=stop_id)
        generated = [[] for _ in outs]
        start = time.perf_counter()
        for step in range(steps):
            rows = [r for r, o in enumerate(outs) if step < len(o)]
            processor(step, logits[:len(rows)], rows, generated)
            for r in rows:
                generated[r].append(outs[r][step])
        best = min(best, (time.perf_counter() - start) / steps)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or default_model_dir(Path(tmp) / "model")
        model, tokenizer, _ = load_model_dir(model_dir)
    model.eval()
    schema = constrained.json_schema(tasks.json_schema(KEYS))
    stop = [tokenizer.endoftext_id]
    constrained.ll_tokenizer(tokenizer, model.cfg.vocab_size, stop[0])  # once per tokenizer, untimed

    def run_peer(prompts, new_tokens):
        return engine.generate(model, prompts, max_new_tokens=new_tokens)

    def run_ours(prompts):
        return constrained.generate(model, tokenizer, prompts, schema, stop_ids=stop, max_new_tokens=NEW_TOKENS)

    results = {}
    for batch in (1, 16):
        prompts = prompts_for(tokenizer, batch)
        sample = run_ours(prompts)  # warm-up, and a look at what the constraint produced
        assert all(tokenizer.decode(o).startswith('{"name": "') for o in sample), tokenizer.decode(sample[0])
        new_tokens = max(map(len, sample))  # greedy: every constrained run produces these same rows
        run_peer(prompts, new_tokens)
        mask_us = replay_us_per_step(tokenizer, schema, model.cfg.vocab_size, stop[0], sample)
        sides = (("peer", lambda: run_peer(prompts, new_tokens)), ("ours", lambda: run_ours(prompts)))
        rounds = []  # (peer tokens, peer seconds, ours tokens, ours seconds)
        for i in range(args.rounds):
            measured = {}
            for side, fn in sides[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                outs = fn()
                measured[side] = (sum(map(len, outs)), time.perf_counter() - start)
            rounds.append(measured["peer"] + measured["ours"])
        ratios = [(o_n / o_s) / (p_n / p_s) for p_n, p_s, o_n, o_s in rounds]
        quiet = sorted(rounds, key=lambda r: r[1] + r[3])[:max(1, len(rounds) // 4)]
        r = results[batch] = {"ours": statistics.median(o_n / o_s for _, _, o_n, o_s in quiet),
                              "peer": statistics.median(p_n / p_s for p_n, p_s, _, _ in quiet),
                              "ratio": statistics.median((o_n / o_s) / (p_n / p_s) for p_n, p_s, o_n, o_s in quiet),
                              "median_ratio": statistics.median(ratios), "mask_us_per_step": round(mask_us, 1),
                              "new_tokens": new_tokens}
        print(f"batch {batch:>2}: constrained {r['ours']:>8,.0f} tokens/s, unconstrained {r['peer']:>8,.0f} tokens/s, "
              f"ratio {r['ratio']:.3f} (the quietest {len(quiet)} of {args.rounds} rounds); all rounds' ratios: median "
              f"{r['median_ratio']:.3f}, range {min(ratios):.2f}-{max(ratios):.2f}; the constraint alone: "
              f"{mask_us:.0f} us per step; {new_tokens} new tokens, e.g. {tokenizer.decode(sample[0])[:40]!r}")

    one, sixteen = results[1], results[16]
    print(json.dumps({"benchmark": "constrained_overhead", "ours": round(one["ours"]), "peer": round(one["peer"]),
                      "unit": "tokens/s", "ratio": round(one["ratio"], 3), "target": 0.85, "batch": 1,
                      "peer_name": "stagewise engine, unconstrained", "constraint": "json_schema name, city, age",
                      "median_ratio": round(one["median_ratio"], 3), "mask_us_per_step": one["mask_us_per_step"],
                      "new_tokens": one["new_tokens"],
                      "threads": torch.get_num_threads(),
                      "batch16": {"ours": round(sixteen["ours"]), "peer": round(sixteen["peer"]),
                                  "ratio": round(sixteen["ratio"], 3),
                                  "median_ratio": round(sixteen["median_ratio"], 3),
                                  "mask_us_per_step": sixteen["mask_us_per_step"],
                                  "new_tokens": sixteen["new_tokens"]}}))


if __name__ == "__main__":
    main()
