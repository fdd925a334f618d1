"""`stagewise run`: the whole pipeline, from nothing to every stage, and a report.

The world's data, pre-training (tokenizer and base model), SFT, the reward model, PPO and DPO,
then the evaluation of `base`, `base+few_shot`, `sft`, `sft+constrained`, `sft+best_of_n`,
`ppo`, `dpo` and `reward_model`, written to `summary.json`, and `report.md` / `report.html`.
The stages are the same functions the individual commands call. One display follows the
whole pipeline; each stage's own log goes to `logs/STAGE.log`. With `--resume`, finished
stages and evaluations are kept and an interrupted stage continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from stagewise import config, training
from stagewise.cli import add_config_arguments
from stagewise.errors import StagewiseError
from stagewise.eval import BEST_OF_BETA, demonstrations_by_task, evaluate_model
from stagewise.model_dir import load_language_model, load_reward_model
from stagewise.stages import common, dpo, ppo, pretrain, reward, sft
from stagewise.world.build import DataConfig, write

STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval", "report")
EVALUATIONS = ("base", "base+few_shot", "sft", "sft+constrained", "sft+best_of_n", "ppo", "dpo", "reward_model")
# Seconds each stage is expected to take with the default preset on a 2-core CPU (one default
# run's, rounded), for the estimate of the time left before a stage has started.
EXPECTED_SECONDS = {"data": 11, "pretrain": 415, "sft": 160, "reward": 160, "ppo": 155, "dpo": 105, "eval": 85,
                    "report": 1}
BEST_OF_N = 8
BEST_OF_EVERY = 4  # best-of-n is evaluated on every 4th held-out prompt (n times the generations)


class Display:
    """One status line for the whole pipeline; the stages' own lines go to their log files."""

    def __init__(self, out: Path, scale: float, stream=sys.stdout):
        self.out, self.scale, self.stream = out, scale, stream
        self.live = stream.isatty()
        self.start = time.time()
        self.index, self.stage, self.log = 0, "", None
        self.last_print = 0.0

    def begin(self, index: int, stage: str) -> None:
        self.index, self.stage = index, stage
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "logs" / f"{stage}.log").open("a", encoding="utf-8")
        self.stage_start = time.time()
        self.show(f"[{index}/{len(STAGES)}] {stage} ...", force=True)

    def end(self, summary: str) -> float:
        seconds = time.time() - self.stage_start
        if self.log:
            self.log.close()
            self.log = None
        self.show(f"[{self.index}/{len(STAGES)}] {self.stage} done in {seconds:.0f}s{': ' + summary if summary else ''}",
                  force=True, final=True)
        return seconds

    def write(self, *parts) -> None:
        """The `log` callable stages get: their messages go to the stage's log file."""
        if self.log:
            self.log.write(" ".join(str(p) for p in parts) + "\n")
            self.log.flush()

    def progress(self, name, step, total, done, eta, line) -> None:
        self.write(line)
        later = sum(EXPECTED_SECONDS[s] for s in STAGES[self.index:]) * self.scale
        if eta != eta:  # a stage that counts steps it cannot time (the evaluations): its expected share left
            eta = EXPECTED_SECONDS[self.stage] * self.scale * (1 - done)
        left = eta + later
        elapsed = time.time() - self.start
        self.show(f"[{self.index}/{len(STAGES)}] {self.stage}: {name} {step}/{total} ({done:.0%}) "
                  f"| {_clock(elapsed)} elapsed, ~{_clock(left)} left")

    def show(self, text: str, force: bool = False, final: bool = False) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        elif force or time.time() - self.last_print > 30:
            self.stream.write(text + "\n")
            self.last_print = time.time()
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(max(0, seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def stage_config(cls, section: str, preset: str):
    return common.resolve(cls, section, SimpleNamespace(preset=preset, overrides=[]))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def evaluate_all(out: Path, world: DataConfig, say, tick) -> dict:
    """Every evaluation of the summary, each cached in eval/NAME.json so a resumed run keeps it."""
    cache = out / "eval"
    cache.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    models = {name: load_language_model(out / name) for name in ("base", "sft", "ppo", "dpo")}
    reward_model, _, reward_lineage = load_reward_model(out / "reward")
    tokenizer = models["base"][1]
    records = common.world_data(world)["eval"]

    def run_once(name: str, fn) -> dict:
        path = cache / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            start = time.time()
            results[name] = fn()
            results[name]["eval_seconds"] = round(time.time() - start, 1)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results[name], ensure_ascii=False))
            os.replace(tmp, path)
        say(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()
                                         if isinstance(v, float) and k != "eval_seconds"))
        done = EVALUATIONS.index(name) + 1
        tick("eval", done, len(EVALUATIONS), done / len(EVALUATIONS), float("nan"), f"{done}/{len(EVALUATIONS)} {name}")
        return results[name]

    def model(name):
        return models[name][0]

    def lineage(name):
        return models[name][2]

    run_once("base", lambda: evaluate_model(model("base"), tokenizer, lineage("base"), world=world))
    run_once("base+few_shot", lambda: evaluate_model(model("base"), tokenizer, lineage("base"), world=world,
                                                      demonstrations=demonstrations_by_task(world)))
    sft_result = run_once("sft", lambda: evaluate_model(model("sft"), tokenizer, lineage("sft"), world=world,
                                                        sample=True))
    run_once("sft+constrained", lambda: evaluate_model(model("sft"), tokenizer, lineage("sft"), world=world,
                                                        constrain_json=True))
    subset = records[::BEST_OF_EVERY]

    def best_of() -> dict:
        result = evaluate_model(model("sft"), tokenizer, lineage("sft"), world=world, eval_records=subset,
                                reward_model=reward_model, best_of=BEST_OF_N)
        # The same prompts answered by the SFT model alone, for a like-for-like comparison.
        own = [s for i, s in enumerate(sft_result["gold_scores"]) if i % BEST_OF_EVERY == 0]
        result["sft_gold_reward_same_prompts"] = sum(own) / len(own)
        result["n"], result["beta"] = BEST_OF_N, BEST_OF_BETA
        return result

    run_once("sft+best_of_n", best_of)
    for name in ("ppo", "dpo"):
        run_once(name, lambda name=name: evaluate_model(model(name), tokenizer, lineage(name), world=world,
                                                          sample=True, sft=model("sft"),
                                                          sft_sampled_scores=sft_result["gold_scores_sampled"]))
    run_once("reward_model", lambda: {"pairwise_accuracy": reward_lineage[-1]["metrics"]["pairwise_accuracy"],
                                      "heldout_pairs": reward_lineage[-1]["metrics"]["heldout_pairs"]})
    return results


def run(preset: str, out: Path, resume: bool, stream=sys.stdout) -> dict:
    if out.exists() and any(out.iterdir()) and not resume:
        raise StagewiseError(f"{out}: already exists and is not empty; pass --resume to continue it, "
                             "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    world = config.resolve(DataConfig, "data", preset, [])
    scale = 1.0 if preset == "default" else 0.1
    display = Display(out, scale, stream)
    timings_path = out / "timings.json"
    seconds = json.loads(timings_path.read_text()) if resume and timings_path.is_file() else {}
    training.set_display(display.progress)
    try:
        def stage(index: int, name: str, fn) -> None:
            display.begin(index, name)
            summary = fn(display.write) or ""
            elapsed = display.end(summary)
            if not (summary == "already done" and name in seconds):  # a kept stage keeps its time
                seconds[name] = round(elapsed, 1)
            timings_path.write_text(json.dumps(seconds, indent=2))

        def finished(path: Path) -> bool:
            return resume and (path / "lineage.json").is_file()

        stage(1, "data", lambda say: write(world, out / "data", log=say) and None)
        models = {name: out / name for name in ("base", "sft", "reward", "ppo", "dpo")}

        def train(name: str, fn) -> str:
            if finished(models[name]):
                return "already done"
            fn()
            return ""

        stage(2, "pretrain", lambda say: train("base", lambda: pretrain.train(
            stage_config(pretrain.PretrainConfig, "pretrain", preset), models["base"], resume=resume, log=say)))
        stage(3, "sft", lambda say: train("sft", lambda: sft.train(
            stage_config(sft.SFTConfig, "sft", preset), models["base"], models["sft"], resume=resume, log=say)))
        stage(4, "reward", lambda say: train("reward", lambda: reward.train(
            stage_config(reward.RewardConfig, "reward", preset), models["sft"], models["reward"], resume=resume,
            log=say)))
        stage(5, "ppo", lambda say: train("ppo", lambda: ppo.train(
            stage_config(ppo.PPOConfig, "ppo", preset), models["sft"], models["reward"], models["ppo"],
            resume=resume, log=say)))
        stage(6, "dpo", lambda say: train("dpo", lambda: dpo.train(
            stage_config(dpo.DPOConfig, "dpo", preset), models["sft"], models["dpo"], resume=resume, log=say)))
        results: dict = {}
        stage(7, "eval", lambda say: results.update(evaluate_all(out, world, say, display.progress)) or "")
        summary = {
            "preset": preset,
            "models": {name: {k: v for k, v in results[name].items() if not k.startswith("gold_scores")}
                       for name in EVALUATIONS},
            "seconds": dict(seconds),
            "seed_example": {"prompt": results["base"]["seed_example"]["prompt"],
                             "base": results["base"]["seed_example"]["response"],
                             "sft": results["sft"]["seed_example"]["response"]},
            "machine": machine(),
        }
        summary["seconds"]["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))

        def write_report(say) -> str:
            from stagewise import report
            report.write(out, summary)
            return "report.md, report.html"

        stage(8, "report", write_report)
        summary["seconds"] = dict(seconds)
        summary["seconds"]["total"] = round(sum(v for k, v in seconds.items() if k != "total"), 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    finally:
        training.set_display(None)
    stream.write(f"stagewise run: wrote {out}/summary.json, {out}/report.md and {out}/report.html "
                 f"in {summary['seconds']['total'] / 60:.1f} minutes of stage time\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/default"), help="directory of the run")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_config_arguments(parser)


def command(args: argparse.Namespace) -> int:
    if args.overrides:
        raise StagewiseError("run takes no key=value overrides; make a preset, or run the stages one by one")
    run(args.preset or "default", args.out, args.resume)
    return 0
