"""`stagewise eval`: the metrics of one model on held-out prompts (SPEC section 5).

A base model gets each instruction as raw text to continue; a model that went through
instruction or preference alignment gets it as a user turn in its chat template. Which one is
decided by the lineage (or `--format`) and stated in the output as `prompt_format`. Responses
are greedy. Each is judged by its family's checker (`instruction_following`, `per_task`), by
whether it answered at all or continued the text (`continuation_rate`), by the simulated
annotator (`gold_reward`) and, for json_record, by whether the whole response is a valid
record (`format_valid`). `heldout_loss` is measured on held-out pre-training text.

Inference-time methods apply on top, and the weights are hashed before and after to prove
they did not change (`weights_unchanged`): few-shot demonstrations and a system prompt
(prompting), constrained decoding of json_record answers to their schema, and best-of-n
sampling with a reward model, regularised by the answers' likelihood (`BEST_OF_BETA`). For a
model with an SFT model in its lineage (or `--sft`), `win_rate_vs_sft` compares the
annotator's scores of both models' answers sampled at temperature 1 (each policy's own
distribution, as PPO samples it; fixed seed), prompt by prompt with ties counting half, and
`kl_to_sft` estimates KL(model || SFT) per response on those samples. Each prompt is answered
SAMPLES_PER_PROMPT times and the win rate is the mean over those draws: with one draw per
prompt, PPO's win rate ranged from 0.611 to 0.637 over four seeds (1,198 prompts, default
preset); the mean of four draws has half the standard error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stagewise import constrained, data, engine, evaluation, prompting
from stagewise.errors import StagewiseError
from stagewise.model import Transformer, weights_sha256
from stagewise.model_dir import load_language_model, load_reward_model
from stagewise.reward_model import RewardModel
from stagewise.stages import common
from stagewise.world import annotator, tasks
from stagewise.world.build import SEED_PROMPT, DataConfig, make_world

MAX_NEW_TOKENS = 64
# Best-of-8 on one SFT model and reward model (default preset), gold_reward of the picks by sampling
# temperature: 1.0 0.912, 0.85 0.923, 0.7 0.926, 0.5 0.927; the greedy answers 0.9235. Below 1 the
# samples are right more often (mean 0.845 at 0.7 against 0.707 at 1.0) and the reward model,
# whose ranking of right answers leans on their likelihood, has fewer wrong ones to pass over.
BEST_OF_TEMPERATURE = 0.7
# The pick maximises reward + beta * log pi(answer), pi the sampling model at temperature 1: the
# objective whose KL penalty RLHF trains against (regularised best-of-n, Jinnai et al., 2024).
# The reward model scores a sum or a held-out person's age one digit off about as high as the
# right one, and the model that sampled them finds the wrong one far less likely. On the 300
# prompts of the default pipeline, two seeds each, against the greedy answers: on one SFT model
# (0.9253) 0.9107 and 0.9113 at beta 0, 0.9253 and 0.9213 at 0.2, 0.9293 and 0.9273 at 1, 0.9273
# and 0.9213 at 3; on another (0.8517) 0.8520 and 0.8477 at 0, 0.8590 and 0.8550 at 1.
BEST_OF_BETA = 1.0
SAMPLES_PER_PROMPT = 4


def generate_answers(model: Transformer, tokenizer, prompts: list[str], *, chat: bool, system: str | None = None,
                     demonstrations: dict[str, list] | list | None = None, tasks_of: list[str] | None = None,
                     constraints: list | None = None, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 256,
                     **sampling) -> list[tuple[str, list[int], list[int], bool]]:
    """(text, prompt ids, response ids with the stop token when there is one, stopped) per prompt.
    `demonstrations` is one list for every prompt, or a dict from task family (`tasks_of`) to
    a list; the first demonstrations are left out of a prompt that they would leave no room
    to answer in. `constraints`: one per prompt (None: free). Batched by prompt length, 256 at a
    time: a decoding step costs mostly its operator calls, so at 256 rows 1,198 prompts sampled
    twice took 7.0-7.6 s against 10.5-11.1 s at 64 (SFT model, default preset, two CPU cores)."""
    rendered = []
    for i, prompt in enumerate(prompts):
        demos = demonstrations.get(tasks_of[i], []) if isinstance(demonstrations, dict) else (demonstrations or [])
        layout = prompting.PLAIN
        if demos and not chat:  # a base model is shown the world's own page for the task
            layout, prompt, demos = prompting.world_page(prompt, demos)
        while True:  # as many demonstrations as leave room for an answer, the last ones first
            r = prompting.render(tokenizer, prompt, chat=chat, system=system, demonstrations=demos, layout=layout)
            if not demos or len(r.ids) + max_new_tokens <= model.cfg.max_seq_len:
                break
            demos = demos[1:]
        rendered.append(r)
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i].ids))
    out: list = [None] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = [rendered[i].ids for i in chunk]
        room = min(max_new_tokens, model.cfg.max_seq_len - max(len(p) for p in ids))
        if room < 1:
            raise StagewiseError(f"eval: a prompt of {max(len(p) for p in ids)} tokens fills the model's context")
        stops = rendered[chunk[0]].stop_ids
        processors = []
        if constraints is not None and any(constraints[i] is not None for i in chunk):
            processors.append(constrained.ConstrainedDecoding(tokenizer, [constraints[i] for i in chunk], len(chunk),
                                                              vocab_size=model.cfg.vocab_size, stop_id=stops[0]))
        paged = [j for j, i in enumerate(chunk) if rendered[i].stop_text is not None]
        if paged:
            processors.append(prompting.StopAtText(tokenizer, prompting.BLOCK_END, stops[0], only=paged))
        results = engine.generate(model, ids, max_new_tokens=room, stop_ids=stops,
                                  logits_processor=_chain(processors), **sampling)
        for i, response in zip(chunk, results):
            stopped = bool(response) and response[-1] in stops
            out[i] = (prompting.response_text(tokenizer, response, rendered[i]), rendered[i].ids, response, stopped)
    return out


def _chain(processors: list):
    """One logits_processor applying several in turn (None when there are none)."""
    if not processors:
        return None
    if len(processors) == 1:
        return processors[0]

    def chained(step, logits, rows, generated):
        for processor in processors:
            logits = processor(step, logits, rows, generated)
        return logits
    return chained


def best_of_n(model: Transformer, tokenizer, reward_model: RewardModel, prompts: list[str], n: int, *, chat: bool,
              seed: int = 0, beta: float = BEST_OF_BETA, tasks_of: list[str] | None = None, **kwargs) -> list[str]:
    """For each prompt, the one of n sampled answers with the highest reward + beta * log-probability
    under `model` (`regularised_rewards`)."""
    repeated = [p for p in prompts for _ in range(n)]
    repeated_tasks = [t for t in tasks_of for _ in range(n)] if tasks_of else None
    candidates = generate_answers(model, tokenizer, repeated, chat=chat, temperature=BEST_OF_TEMPERATURE, seed=seed,
                                  tasks_of=repeated_tasks, **kwargs)
    scores = regularised_rewards(model, reward_scores(reward_model, tokenizer, repeated, [c[0] for c in candidates]),
                                 [c[1] for c in candidates], [c[2] for c in candidates], beta)
    best = []
    for i in range(len(prompts)):
        window = scores[i * n:(i + 1) * n]
        best.append(candidates[i * n + window.index(max(window))][0])
    return best


def regularised_rewards(model: Transformer, rewards: list[float], prompt_ids: list[list[int]],
                        responses: list[list[int]], beta: float) -> list[float]:
    """reward + beta * each response's log-probability under `model`, what best-of-n maximises
    (the rewards alone, and no forward pass, when beta is 0)."""
    if not beta:
        return rewards
    return [r + beta * lp for r, lp in zip(rewards, answer_logprobs(model, prompt_ids, responses))]


@torch.no_grad()
def answer_logprobs(model: Transformer, prompt_ids: list[list[int]], responses: list[list[int]],
                    batch_size: int = 64) -> list[float]:
    """Each response's summed log-probability given its prompt under `model` at temperature 1 (0
    for an empty one). Read in order of length, so that a batch has little padding: on 4,800
    answers of a PPO model, 7.6 s against 8.6 s in the given order for `kl_to`'s two models (and
    10.8 s sorted, 256 at a time)."""
    order = sorted(range(len(responses)), key=lambda i: len(prompt_ids[i]) + len(responses[i]))
    out = [0.0] * len(responses)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start:start + batch_size] if responses[i]]
        if chunk:
            logp, mask = engine.sequence_logprobs(model, [prompt_ids[i] for i in chunk], [responses[i] for i in chunk])
            for i, value in zip(chunk, (logp * mask).sum(-1).tolist()):
                out[i] = value
    return out


@torch.no_grad()
def reward_scores(reward_model: RewardModel, tokenizer, prompts: list[str], responses: list[str],
                  batch_size: int = 128) -> list[float]:
    """The reward model's score of each (prompt, response), the response rendered as the
    assistant's turn after the prompt as a user turn, as the reward model was trained."""
    pairs = [common.chat_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    cut = reward_model.cfg.max_seq_len  # a sequence longer than the context is cut at its end
    pairs = [(p[:cut], r[:cut - len(p[:cut])]) for p, r in pairs]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        scores += reward_model.score_responses([p for p, _ in chunk], [r for _, r in chunk], tokenizer.pad_id).tolist()
    return scores


def score_responses(records: list[dict], responses: list[str], judge=None) -> dict:
    """The instruction metrics for responses to eval records ({"task", "prompt", "reference"})."""
    per_task: dict[str, list[bool]] = {}
    continued, gold, valid = [], [], []
    for record, response in zip(records, responses):
        task, reference = record["task"], record["reference"]
        if task not in tasks.TASKS:
            raise StagewiseError(f"eval record for task {task!r}: no checker; tasks are {', '.join(tasks.TASKS)}")
        per_task.setdefault(task, []).append(tasks.check(task, reference, response))
        continued.append(not tasks.attempts_answer(task, reference, response))
        if judge is not None:
            gold.append(judge(record["prompt"], response))
        if task == "json_record":
            valid.append(tasks.format_valid(reference, response))
    correct = [c for values in per_task.values() for c in values]
    return {
        "instruction_following": _mean(correct),
        "continuation_rate": _mean(continued),
        "per_task": {t: _mean(v) for t, v in sorted(per_task.items())},
        "format_valid": _mean(valid) if valid else None,
        "gold_reward": _mean(gold) if gold else None,
        "n_prompts": len(records),
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


def win_rate(scores: list[float], baseline: list[float]) -> float:
    """Share of prompts where the annotator prefers the model's answer (ties count half); with
    several sampled answers per prompt, the mean of that share over the draws."""
    if len(scores) != len(baseline):
        raise StagewiseError(f"win rate: {len(scores)} scores against {len(baseline)} of the baseline")
    return _mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline)])


@torch.no_grad()
def kl_to(model: Transformer, reference: Transformer, answers: list[tuple]) -> float:
    """Mean over answers of sum_t log model(y_t) - log reference(y_t), for answers sampled from
    the model (from `generate_answers`): a Monte Carlo estimate of KL(model || reference) per
    response, in nats."""
    prompt_ids, responses = [a[1] for a in answers], [a[2] for a in answers]
    logp, ref_logp = answer_logprobs(model, prompt_ids, responses), answer_logprobs(reference, prompt_ids, responses)
    return sum(a - b for a, b in zip(logp, ref_logp)) / len(answers)


def evaluate_model(model: Transformer, tokenizer, lineage: list[dict] | None, *, world: DataConfig,
                   eval_records: list[dict] | None = None, chat: bool | None = None, system: str | None = None,
                   demonstrations: dict | list | None = None, constrain_json: bool = False,
                   reward_model: RewardModel | None = None, best_of: int = 0, best_of_beta: float = BEST_OF_BETA,
                   sample: bool = False, sft: Transformer | None = None,
                   sft_sampled_scores: list[float] | None = None) -> dict:
    """Every metric that applies to this model and these inference-time methods, plus the
    responses to the seed prompt. Greedy answers give the instruction metrics and
    `gold_reward`. With `sample`, every prompt is also answered by sampling at temperature 1,
    `SAMPLES_PER_PROMPT` times (the policy as PPO trains it; fixed seed): `gold_reward_sampled`,
    and against the SFT model's sampled scores `win_rate_vs_sft`, and with the SFT model
    `kl_to_sft` on those samples. `gold_scores_sampled` (prompt by prompt, each prompt's draws in
    a row) is returned for comparisons elsewhere."""
    before = weights_sha256(model)
    chat = prompting.is_chat(lineage) if chat is None else chat
    world_data = common.world_data(world)
    records = eval_records if eval_records is not None else world_data["eval"]
    # The annotator judges the world's own prompts (all of them or a subset), not a user's.
    world_keys = {(r["task"], r["prompt"], r["reference"]) for r in world_data["eval"]}
    from_world = all((r["task"], r["prompt"], r["reference"]) in world_keys for r in records)
    people = make_world(world).people_by_name if from_world else None
    prompts = [r["prompt"] for r in records]
    task_of = [r["task"] for r in records]
    constraints = None
    if constrain_json:
        constraints = [constrained.json_schema(r.get("schema") or tasks.json_schema(list(json.loads(r["reference"]))))
                       if r["task"] == "json_record" else None for r in records]
    options = dict(chat=chat, system=system, demonstrations=demonstrations)
    if best_of:
        if reward_model is None:
            raise StagewiseError("eval: best-of-n needs a reward model (--reward)")
        texts = best_of_n(model, tokenizer, reward_model, prompts, best_of, beta=best_of_beta, tasks_of=task_of,
                          **options)
        stopped = None
    else:
        # A bounded record fits in 128 tokens: room enough that no constrained answer is cut short.
        answers = generate_answers(model, tokenizer, prompts, tasks_of=task_of, constraints=constraints,
                                   max_new_tokens=128 if constrain_json else MAX_NEW_TOKENS, **options)
        texts, stopped = [a[0] for a in answers], [a[3] for a in answers]
    judge = (lambda p, r: annotator.gold_score(p, r, people)) if people is not None else None
    metrics = score_responses(records, texts, judge)
    if stopped is not None:
        metrics["stop_rate"] = _mean(stopped)
    seed = generate_answers(model, tokenizer, [SEED_PROMPT], tasks_of=["translate_en_fr"], **options)[0][0]
    heldout = [r["text"] for r in world_data["heldout_text"]]
    tokens = torch.cat([torch.tensor([tokenizer.endoftext_id] + ids) for ids in tokenizer.encode_batch(heldout)])
    metrics["heldout_loss"] = evaluation.heldout_loss(model, tokens, model.cfg.max_seq_len)
    metrics["prompt_format"] = "chat" if chat else "raw"
    metrics["methods"] = [m for m, on in (("system_prompt", system), ("few_shot", demonstrations),
                                          ("constrained", constrain_json), ("best_of_n", best_of)) if on]
    if judge is not None:
        metrics["gold_scores"] = [judge(p, t) for p, t in zip(prompts, texts)]
    if sample:
        k = SAMPLES_PER_PROMPT
        drawn = [p for p in prompts for _ in range(k)]
        samples = generate_answers(model, tokenizer, drawn, tasks_of=[t for t in task_of for _ in range(k)],
                                   temperature=1.0, seed=0, **options)
        if judge is not None:
            metrics["gold_scores_sampled"] = [judge(p, a[0]) for p, a in zip(drawn, samples)]
            metrics["gold_reward_sampled"] = _mean(metrics["gold_scores_sampled"])
            if sft_sampled_scores is not None:
                metrics["win_rate_vs_sft"] = win_rate(metrics["gold_scores_sampled"], sft_sampled_scores)
        if sft is not None:
            metrics["kl_to_sft"] = kl_to(model, sft, samples)
    metrics["seed_example"] = {"prompt": SEED_PROMPT, "response": seed}
    metrics["examples"] = [{"task": r["task"], "prompt": r["prompt"], "response": t}
                           for r, t in list(zip(records, texts))[:: max(1, len(records) // 12)]]
    metrics["weights_unchanged"] = weights_sha256(model) == before
    return metrics


def sft_parent(lineage: list[dict] | None) -> Path | None:
    """The directory of the SFT model this model was trained from, when the lineage names one:
    the parent of the first of the preference stages that end the lineage (DPO on a PPO model
    still compares with the SFT model both came from)."""
    parent = None
    for entry in reversed(lineage or []):
        if entry.get("method") not in ("ppo", "dpo"):
            break
        parent = Path(entry["parent"]) if entry.get("parent") else parent
    return parent


def demonstrations_by_task(world: DataConfig, per_task: int = 3) -> dict[str, list]:
    """Few-shot demonstrations for the embedded world: `per_task` ideal SFT answers per family."""
    sft = common.world_data(world)["sft"]
    people = make_world(world).people_by_name
    out: dict[str, list] = {t: [] for t in tasks.TASKS}
    for record in sft:
        prompt, response = (m["content"] for m in record["messages"])
        example = tasks.solve(prompt, people)
        if example and response == example.reference and len(out[example.task]) < per_task:
            out[example.task].append(record["messages"])
        if all(len(v) == per_task for v in out.values()):
            break
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory")
    parser.add_argument("--data", type=Path, default=None,
                        help='eval JSONL ({"task", "prompt", "reference"}); default: the embedded world')
    parser.add_argument("--format", choices=("auto", "raw", "chat"), default="auto",
                        help="prompt format; auto: chat when the lineage has sft, ppo or dpo")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--few-shot", type=Path, default=None,
                        help="JSONL of demonstrations shown before every prompt; 'world' for the embedded world's "
                             "own, per task family")
    parser.add_argument("--constrained", action="store_true",
                        help="constrain json_record answers to their JSON schema (llguidance)")
    parser.add_argument("--reward", type=Path, default=None, help="reward model directory, for --best-of")
    parser.add_argument("--best-of", type=int, default=0, help="best-of-n sampling with the reward model")
    parser.add_argument("--best-of-beta", type=float, default=BEST_OF_BETA,
                        help="the pick maximises reward + beta * log-probability (0: the reward alone)")
    parser.add_argument("--sft", type=Path, default=None,
                        help="SFT model for win_rate_vs_sft and kl_to_sft; default: the lineage's parent")
    parser.add_argument("--preset", default="default", help="the preset whose world to evaluate on")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def command(args: argparse.Namespace) -> int:
    from stagewise import config
    world = config.resolve(DataConfig, "data", args.preset, [])
    records = data.load(args.data, "eval") if args.data else None
    model, tokenizer, lineage = load_language_model(args.model)
    reward_model = load_reward_model(args.reward)[0] if args.reward else None
    if args.best_of and reward_model is None:
        raise StagewiseError("--best-of needs --reward REWARD_DIR")
    demonstrations = None
    if args.few_shot is not None:
        demonstrations = (demonstrations_by_task(world) if str(args.few_shot) == "world"
                          else prompting.load_demonstrations(args.few_shot))
    chat = None if args.format == "auto" else args.format == "chat"
    sft_dir = args.sft or sft_parent(lineage)
    sft_model, sft_scores = None, None
    if sft_dir is not None and sft_dir.exists():
        sft_model, _, sft_lineage = load_language_model(sft_dir)
        if records is None:
            sft_scores = evaluate_model(sft_model, tokenizer, sft_lineage, world=world,
                                        sample=True)["gold_scores_sampled"]
    metrics = evaluate_model(model, tokenizer, lineage, world=world, eval_records=records, chat=chat,
                             system=args.system, demonstrations=demonstrations, constrain_json=args.constrained,
                             reward_model=reward_model, best_of=args.best_of, best_of_beta=args.best_of_beta,
                             sample=sft_model is not None,
                             sft=sft_model, sft_sampled_scores=sft_scores)
    metrics.pop("gold_scores", None)
    metrics.pop("gold_scores_sampled", None)
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
        return 0
    methods = f", with {', '.join(metrics['methods'])}" if metrics["methods"] else ""
    print(f"{args.model} ({metrics['prompt_format']} prompts, {metrics['n_prompts']} held-out instructions{methods})")
    for key in ("heldout_loss", "instruction_following", "continuation_rate", "gold_reward", "gold_reward_sampled",
                "format_valid", "win_rate_vs_sft", "kl_to_sft", "stop_rate"):
        if metrics.get(key) is not None:
            print(f"  {key:<22} {metrics[key]:.3f}")
    for task, value in metrics["per_task"].items():
        print(f"    {task:<20} {value:.3f}")
    print(f"  weights_unchanged      {metrics['weights_unchanged']}")
    print(f"  seed prompt: {SEED_PROMPT!r}\n  response:    {metrics['seed_example']['response']!r}")
    return 0
