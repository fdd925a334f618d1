"""The report of a run: `report.md` and a self-contained `report.html`, written last by `stagewise run`.

`write(out, summary)` reads the run directory (each stage's `metrics.jsonl` and `lineage.json`,
`ppo/overoptimisation.csv`) and the summary, draws the plots into `out/report/`, and renders one
list of sections twice: as Markdown that links the PNGs, and as HTML that embeds them as base64
with inline CSS, so the HTML opens anywhere with no network. Every input is optional: this runs
at the very end of a long pipeline, so a missing file or key leaves a blank cell or drops a plot
rather than losing the run's report.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from stagewise.methods import CATALOGUE

MODELS = ("base", "base+few_shot", "sft", "sft+constrained", "sft+best_of_n", "ppo", "dpo", "reward_model")
TASKS = ("translate_en_fr", "translate_fr_en", "arithmetic", "facts", "json_record", "word_ops")
STAGES = ("data", "pretrain", "sft", "reward", "ppo", "dpo", "eval", "report")
MODEL_DIRS = ("base", "sft", "reward", "ppo", "dpo")
METRICS = ("instruction_following", "continuation_rate", "gold_reward", "format_valid", "win_rate_vs_sft",
           "kl_to_sft", "heldout_loss", "weights_unchanged", "pairwise_accuracy", "n_prompts")
STAGE_WORDS = {"data": "built the world's data", "pretrain": "pre-trained a base model on raw text",
               "sft": "fine-tuned it on instructions (SFT)", "reward": "trained a reward model on preference pairs",
               "ppo": "aligned the SFT model with PPO against that reward model",
               "dpo": "aligned it, separately, with DPO", "eval": "evaluated every model",
               "report": "wrote this report"}
# Lineage metrics that are bookkeeping rather than results, left out of the "key metrics" column.
BOOKKEEPING = {"seconds", "steps", "tokens_seen", "iterations"}
EXAMPLES_PER_MODEL = 3
EXAMPLE_CHARS = 160
FIGSIZE, DPI = (6, 3.5), 90


# One document, rendered to both formats, so the Markdown and the HTML cannot drift apart.
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    title: str
    path: str  # relative to the run directory


@dataclass
class Code:
    text: str


@dataclass
class Subheading:
    text: str


@dataclass
class Section:
    title: str
    parts: list = field(default_factory=list)


def write(out: Path, summary: dict) -> None:
    """Write `out/report.md`, `out/report.html` and the plots they show under `out/report/`."""
    out = Path(out)
    summary = summary if isinstance(summary, dict) else {}
    models = _dict(summary.get("models"))
    sections = [
        _overview(summary, models),
        _seed(_dict(summary.get("seed_example"))),
        _metrics(models),
        Section("4. Plots", _plots(out, models)),
        _lineage(out, models),
        _timings(_dict(summary.get("seconds"))),
        _machine(_dict(summary.get("machine"))),
        _examples(models),
    ]
    title = f"stagewise run: {summary.get('preset', 'unknown')} preset"
    (out / "report.md").write_text(render_markdown(title, sections), encoding="utf-8")
    (out / "report.html").write_text(render_html(title, sections, out), encoding="utf-8")


# ---- the sections ----

def _overview(summary: dict, models: dict) -> Section:
    seconds = _dict(summary.get("seconds"))
    done = [STAGE_WORDS[s] for s in STAGES if s in seconds]
    text = f"This run used the '{summary.get('preset', 'unknown')}' preset. "
    if done:
        text += "It " + ", ".join(done[:-1]) + (" and " if len(done) > 1 else "") + done[-1] + ". "
    if models:
        text += f"The {len(models)} evaluations: {', '.join(_ordered(models))}. "
    total = _total_seconds(seconds)
    if total is not None:
        text += f"The stages took {total / 60:.1f} minutes in all ({total:.0f} s)."
    return Section("1. What this run did", [text])


def _seed(seed: dict) -> Section:
    if not seed:
        return Section("2. The seed example", ["The run recorded no seed example."])
    return Section("2. The seed example", [
        "The same prompt given to the model before and after instruction alignment:",
        Code(str(seed.get("prompt", ""))),
        Table(["Model A: pre-trained only (continues text)", "Model B: instruction-aligned (SFT)"],
              [[str(seed.get("base", "")), str(seed.get("sft", ""))]]),
    ])


def _metrics(models: dict) -> Section:
    rows = []
    for name in _ordered(models):
        m = _dict(models[name])
        methods = m.get("methods")
        rows.append([name] + [_fmt(m.get(k)) for k in METRICS] + [
            _fmt(m.get("prompt_format")), ", ".join(map(str, methods)) if isinstance(methods, list) else ""])
    parts: list = ["Numbers to 3 decimals; a blank cell is a metric that does not apply or was not measured.",
                   Table(["model", *METRICS, "prompt format", "inference-time methods"], rows)]
    best = _dict(models.get("sft+best_of_n"))
    if best:
        parts.append(
            f"sft+best_of_n was evaluated on a subset of the held-out prompts ({_fmt(best.get('n_prompts')) or '?'} "
            f"of them), keeping the best of n={_fmt(best.get('n')) or '?'} samples by the reward model and their "
            f"likelihood: its gold_reward is {_fmt(best.get('gold_reward')) or 'not measured'}, beside "
            f"{_fmt(best.get('sft_gold_reward_same_prompts')) or 'not measured'} for the SFT model on the same "
            "prompts (sft_gold_reward_same_prompts).")
    per_task = {name: _dict(_dict(models[name]).get("per_task")) for name in _ordered(models)}
    per_task = {name: scores for name, scores in per_task.items() if scores}
    if per_task:
        tasks = list(TASKS) + sorted({t for scores in per_task.values() for t in scores} - set(TASKS))
        rows = [[name] + [_fmt(scores.get(t)) for t in tasks] for name, scores in per_task.items()]
        parts += [Subheading("instruction_following per task"), Table(["model", *tasks], rows)]
    return Section("3. Models and metrics", parts)


def _lineage(out: Path, models: dict) -> Section:
    parts: list = [Subheading("The method catalogue"), Table(
        ["id", "stage", "family", "applied at", "changes weights", "needs"],
        [[m.id, m.stage, m.family, m.applied_at, m.changes_weights, m.needs] for m in CATALOGUE.values()])]
    last: dict[str, dict] = {}  # each model directory's newest lineage entry: the weights evaluated
    for name in MODEL_DIRS:
        entries = _read_json(out / name / "lineage.json")
        if not isinstance(entries, list) or not entries:
            continue
        last[name] = _dict(entries[-1])
        rows = [[str(i + 1), str(e.get("method", "")), str(e.get("applied_at", "")), _fmt(e.get("changes_weights")),
                 str(e.get("weights_sha256") or "")[:12], _key_metrics(_dict(e.get("metrics")))]
                for i, e in enumerate(entries) if isinstance(e, dict)]
        parts += [Subheading(f"Lineage of {name}/"),
                  Table(["#", "method", "applied at", "changes weights", "weights sha256", "key metrics"], rows)]
    rows = []
    for name in _ordered(models):
        if "+" not in name:
            continue
        base, *suffix = name.split("+")
        methods = _dict(models[name]).get("methods")
        methods = methods if isinstance(methods, list) and methods else suffix
        applied = [f"{m} ({CATALOGUE[m].applied_at})" if m in CATALOGUE else str(m) for m in methods]
        weights = f"{base}/"
        if base in last:
            weights += f" ({last[base].get('method', '?')}, {str(last[base].get('weights_sha256') or '')[:12]})"
        rows.append([name, weights, ", ".join(applied), _fmt(_dict(models[name]).get("weights_unchanged"))])
    if rows:
        parts += [Subheading("Inference-time methods applied in evaluation"),
                  "These evaluations use a trained model's weights as they are; the weights are hashed before "
                  "and after to check that the method left them unchanged.",
                  Table(["evaluation", "weights from", "methods", "weights_unchanged"], rows)]
    return Section("5. Methods and lineage", parts)


def _timings(seconds: dict) -> Section:
    total = _total_seconds(seconds)
    names = [s for s in STAGES if s in seconds] + sorted(set(seconds) - set(STAGES) - {"total"})
    rows = []
    for s in names:
        value = seconds[s] if _num(seconds[s]) else None
        rows.append([s, _fmt(value, 1), "" if value is None else f"{value / 60:.1f}",
                     f"{100 * value / total:.0f}%" if value is not None and total else ""])
    if total is not None:
        rows.append(["total", _fmt(total, 1), _fmt(total / 60, 1), "100%"])
    if not rows:
        return Section("6. Timings", ["The run recorded no timings."])
    return Section("6. Timings", [Table(["stage", "seconds", "minutes", "share"], rows)])


def _machine(machine: dict) -> Section:
    if not machine:
        return Section("7. Machine", ["The run recorded no machine description."])
    keys = [k for k in ("cpu", "cores", "torch_threads", "gpu", "platform", "python", "torch") if k in machine]
    keys += sorted(set(machine) - set(keys))
    return Section("7. Machine", [Table(["", ""], [[k, "none" if machine[k] is None else str(machine[k])]
                                                  for k in keys])])


def _examples(models: dict) -> Section:
    rows = []
    for name in _ordered(models):
        examples = _dict(models[name]).get("examples")
        for e in (examples if isinstance(examples, list) else [])[:EXAMPLES_PER_MODEL]:
            if isinstance(e, dict):
                rows.append([name, str(e.get("task", "")), _short(e.get("prompt")), _short(e.get("response"))])
    if not rows:
        return Section("8. Example answers", ["The run recorded no example answers."])
    return Section("8. Example answers", [f"The first {EXAMPLES_PER_MODEL} recorded answers of each model, "
                                          f"cut at {EXAMPLE_CHARS} characters.",
                                          Table(["model", "task", "prompt", "response"], rows)])


# ---- the plots ----

# (model dir, title, x key, [(y key, label)] on the left axis, [(y key, label)] on the right, axis labels)
CURVES = (
    ("base", "Pre-training", "step", [("loss", "training loss"), ("heldout_loss", "held-out loss")], [],
     "loss (nats)", ""),
    ("sft", "SFT", "step", [("loss", "training loss"), ("validation_loss", "validation loss")], [],
     "loss (nats)", ""),
    ("reward", "Reward model", "step", [("loss", "training loss")],
     [("accuracy", "training accuracy"), ("pairwise_accuracy", "held-out pairwise accuracy")], "loss", "accuracy"),
    ("dpo", "DPO", "step", [("loss", "loss"), ("rewards/margins", "reward margin")],
     [("rewards/accuracies", "reward accuracy"), ("samples/gold_score", "annotator's score of the round's samples")],
     "loss / margin", "accuracy / score"),
    ("ppo", "PPO", "iteration", [("objective/scores", "proxy score (reward model)"),
                                 ("gold/score", "gold score (annotator)")],
     [("objective/kl", "KL to SFT")], "score", "KL (nats)"),
)


def _plots(out: Path, models: dict) -> list:
    import matplotlib
    matplotlib.use("Agg")  # files only: the run may have no display
    folder = out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    parts: list = []

    def add(title: str, filename: str, draw) -> None:
        # A plot that fails to draw costs that plot, not the report of a run that took an hour.
        try:
            drawn = draw(folder / filename)
        except Exception as error:  # noqa: BLE001
            parts.append(f"{title}: could not be drawn ({type(error).__name__}: {error}).")
            return
        if drawn:
            parts.append(Image(title, f"report/{filename}"))

    for spec in CURVES:
        add(spec[1], f"{spec[0]}_curves.png", lambda path, spec=spec: _stage_curves(out, spec, path))
    add("Reward-model overoptimisation during PPO", "overoptimisation.png", lambda path: _overoptimisation(out, path))
    add("Models compared", "models.png", lambda path: _model_bars(models, path))
    if not parts:
        parts.append("The run directory holds nothing to plot.")
    return parts


def _stage_curves(out: Path, spec: tuple, path: Path) -> bool:
    directory, title, x, left, right, left_label, right_label = spec
    rows = _read_jsonl(out / directory / "metrics.jsonl")
    return _curve(path, title, x, [(label, *_series(rows, x, key)) for key, label in left],
                  [(label, *_series(rows, x, key)) for key, label in right], left_label, right_label)


def _curve(path: Path, title: str, xlabel: str, left: list, right: list, left_label: str, right_label: str) -> bool:
    import matplotlib.pyplot as plt
    left, right = [s for s in left if s[1]], [s for s in right if s[1]]
    if not left:
        left, right, left_label, right_label = right, [], right_label, ""
    if not left:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE)
    lines = []
    for i, (label, xs, ys) in enumerate(left):
        lines += ax.plot(xs, ys, color=f"C{i}", label=label, marker="." if len(xs) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(left_label)
    if right:
        twin = ax.twinx()  # accuracies and KL live on another scale than losses and scores
        for i, (label, xs, ys) in enumerate(right, start=len(left)):
            lines += twin.plot(xs, ys, color=f"C{i}", label=label, linestyle="--",
                               marker="." if len(xs) < 40 else None)
        twin.set_ylabel(right_label)
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def _overoptimisation(out: Path, path: Path) -> bool:
    """Proxy and gold score against sqrt(KL), redrawn from the CSV at the report's size; the
    PPO stage's own PNG is copied when the CSV is missing."""
    rows = []
    try:
        with (out / "ppo" / "overoptimisation.csv").open(newline="") as f:
            rows = [{k: _float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except OSError:
        pass
    if not rows:
        png = out / "ppo" / "overoptimisation.png"
        if png.is_file():
            shutil.copyfile(png, path)
            return True
        return False
    series = []
    for key, label in (("proxy_score", "proxy reward (reward model)"), ("gold_score", "gold score (annotator)")):
        points = [(r["sqrt_kl"], r[key]) for r in rows if r.get("sqrt_kl") is not None and r.get(key) is not None]
        series.append((label, [p[0] for p in points], [p[1] for p in points]))
    return _curve(path, "Reward-model overoptimisation during PPO", "sqrt(KL to the SFT model), nats^0.5",
                  series, [], "mean score of the rollouts", "")


def _model_bars(models: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt
    keys = ("instruction_following", "gold_reward")
    names = [n for n in _ordered(models) if any(_num(_dict(models[n]).get(k)) for k in keys)]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=FIGSIZE)
    width = 0.4
    for i, key in enumerate(keys):
        values = [_dict(models[n]).get(key) for n in names]
        ax.bar([j + (i - 0.5) * width for j in range(len(names))], [v if _num(v) else 0 for v in values],
               width, label=key, color=f"C{i}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share / score (0 to 1)")
    ax.set_title("Models compared")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# ---- rendering ----

def render_markdown(title: str, sections: list[Section]) -> str:
    """The sections as Markdown; images are linked by their path relative to the run directory."""
    lines = [f"# {_text(title)}", ""]
    for section in sections:
        lines += [f"## {_text(section.title)}", ""]
        for part in section.parts:
            if isinstance(part, Subheading):
                lines += [f"### {_text(part.text)}", ""]
            elif isinstance(part, Table):
                cell = lambda s: _text(s).replace("|", "\\|")  # noqa: E731
                lines.append("| " + " | ".join(cell(h) for h in part.header) + " |")
                lines.append("|" + "---|" * len(part.header))
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in part.rows]
                lines.append("")
            elif isinstance(part, Image):
                lines += [f"![{_text(part.title)}]({part.path})", ""]
            elif isinstance(part, Code):
                fence = "~~~~" if "```" in part.text else "```"  # a fence the text cannot close early
                lines += [fence, part.text, fence, ""]
            else:
                lines += [_text(part), ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.5rem; white-space: pre-wrap; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; }
img { max-width: 100%; }
"""


def render_html(title: str, sections: list[Section], out: Path) -> str:
    """The sections as one HTML file with inline CSS and every image embedded, so it needs no network."""
    body = [f"<h1>{_text(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{_text(section.title)}</h2>")
        for part in section.parts:
            if isinstance(part, Subheading):
                body.append(f"<h3>{_text(part.text)}</h3>")
            elif isinstance(part, Table):
                head = "".join(f"<th>{_text(h)}</th>" for h in part.header)
                rows = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in part.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(part, Image):
                data = base64.b64encode((out / part.path).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(part.title)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_text(part.title)}</figcaption></figure>")
            elif isinstance(part, Code):
                body.append(f"<pre>{html.escape(part.text)}</pre>")
            else:
                body.append(f"<p>{_text(part)}</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_text(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


# ---- small helpers ----

def _text(value: object) -> str:
    """Plain text made safe for HTML (and Markdown, which passes HTML through), newlines kept."""
    return html.escape(str(value), quote=False).replace("\n", "<br>")


def _fmt(value: object, decimals: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{decimals}f}"
    return str(value)


def _short(value: object) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + "…"


def _key_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if _num(v) and k not in BOOKKEEPING)


def _num(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _ordered(models: dict) -> list[str]:
    return [m for m in MODELS if m in models] + [m for m in models if m not in MODELS]


def _total_seconds(seconds: dict) -> float | None:
    if _num(seconds.get("total")):
        return float(seconds["total"])
    parts = [v for k, v in seconds.items() if k != "total" and _num(v)]
    return float(sum(parts)) if parts else None


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in rows if _num(r.get(x)) and _num(r.get(y))]
    return [p[0] for p in points], [p[1] for p in points]


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a last line cut short by an interrupted stage
        if isinstance(row, dict):
            rows.append(row)
    return rows
