"""The speedrun's report: `report.json`, `report.md` and `plots/*.png`, from the stages' evaluations.

Every stage is scored greedily on the same fixed set of distinct held-out `test` problems (>= 1,000 with the cpu
recipe), so two stages can be compared problem by problem: wrong->right vs right->wrong flips and an exact
two-sided sign test. pass@k comes from k samples at T = 1 on a per-level subset. report.md is rendered from
report.json, so the two always hold the same numbers.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from nanoseek.io import atomic_write_text
from nanoseek.speedrun.evaluate import LEVEL_NAMES, MULTI_DIGIT_LEVELS, STAGE_TITLES, STAGES, mtp_acceptance
from nanoseek.speedrun.figures import FIGURES, plot_report
from nanoseek.speedrun.recipe import Recipe, checkpoint_of
from nanoseek.train.metrics import read_metrics


# ------------------------------------------------------------------------------------------------ report
def _machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    info["python"] = platform.python_version()
    if device != "cpu" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _train_stage_stats(run_dir: Path, wall_s: float) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step" in r]
    last = records[-1]
    vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    mfus = [r["mfu"] for r in records if isinstance(r.get("mfu"), (int, float))]
    loads = last.get("max_load_violation") or []
    return {
        "steps": last["step"],
        "tokens": last["tokens"],
        "train_s": last["elapsed_s"],
        "wall_s": wall_s,
        "tokens_per_s": last["tokens"] / max(last["elapsed_s"], 1e-9),
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "train_loss": last["loss"],
        "val_loss": vals[-1] if vals else None,
        "expert_max_over_mean": [1 + v for v in loads],
    }


def _grpo_stats(run_dir: Path, wall_s: float, recipe: Recipe) -> dict[str, Any]:
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward_mean" in r]
    per_step = recipe.grpo_prompts * recipe.grpo_group * recipe.processes  # prompts per step count per process
    tokens = sum(r["response_len"] * per_step * r.get("rounds", 1) for r in records)
    roll = sum(r["rollout_s"] for r in records)
    upd = sum(r["update_s"] for r in records)
    head, tail = records[: max(1, len(records) // 10)], records[-max(1, len(records) // 10) :]

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": records[-1]["step"],
        "train_s": records[-1]["elapsed_s"],
        "wall_s": wall_s,
        "rollout_tokens": int(tokens),
        "tokens_per_s": tokens / max(records[-1]["elapsed_s"], 1e-9),
        "rollout_share": roll / max(roll + upd, 1e-9),
        "reward_first_10pct": mean(head, "reward_mean"),
        "reward_last_10pct": mean(tail, "reward_mean"),
        "zero_variance_groups_first_10pct": mean(head, "frac_zero_std"),
        "zero_variance_groups_last_10pct": mean(tail, "frac_zero_std"),
        "response_len_first_10pct": mean(head, "response_len"),
        "response_len_last_10pct": mean(tail, "response_len"),
        "entropy_first_10pct": mean(head, "entropy") if all("entropy" in r for r in head) else None,
    }


def build_report(
    out: Path, recipe: Recipe, preset: str, stages: dict[str, dict], evals: dict[str, dict]
) -> dict[str, Any]:
    """report.json's content: the stages' wall times (`stages`), their evaluations (`evals`, by stage) and the
    training curves. Training numbers come from each run's metrics.jsonl: a resumed stage's returned summary
    covers only the steps after the interruption."""
    from nanoseek.checkpoint.hf import load_model
    from nanoseek.eval.evaluate import compare

    model = load_model(checkpoint_of(out / "pretrain"), device="meta")
    c = model.config
    k = recipe.k
    rows: dict[str, Any] = {}
    prev = None
    for s in STAGES:
        e = evals[s]
        row = {
            "accuracy": e["accuracy"],
            "n": e["n"],
            "levels": {
                lv: {
                    "n": v["n"],
                    "accuracy": v["accuracy"],
                    "think_rate": e["think_levels"][lv],
                    "mean_length": e["length_levels"][lv],
                    **e["reasoning_levels"][lv],  # [n, correct] with steps and answer-only
                }
                for lv, v in e["levels"].items()
            },
            f"pass@{k}": e[f"pass@{k}"],
            "passk_n": e["passk_n"],
            "passk_levels": e["passk_levels"],
            "sampled_accuracy": e["sampled_accuracy"],
            "format_rate": e["format_rate"],
            "think_rate": e["think_rate"],
            "mean_length": e["mean_length"],
            "examples": e["examples"],
            "expert_load": e["expert_load"],
        }
        if prev is not None:
            if evals[prev]["prompts"] != e["prompts"]:
                raise RuntimeError("the stages were evaluated on different problems: delete eval/ and rerun")
            row["vs_previous"] = {"stage": prev, **compare(evals[prev]["correct"], e["correct"])}
        rows[s] = row
        prev = s
    train = {
        "pretrain": _train_stage_stats(out / "pretrain", stages["pretrain"]["wall_s"]),
        "sft": _train_stage_stats(out / "sft", stages["sft"]["wall_s"]),
        "grpo": _grpo_stats(out / "grpo", stages["grpo"]["wall_s"], recipe),
    }
    total_s = sum(v["wall_s"] for v in stages.values())
    return {
        "date": time.strftime("%Y-%m-%d"),
        "preset": preset,
        "recipe": {k2: v for k2, v in vars(recipe).items()},
        "machine": _machine(recipe.device),
        "model": {
            "preset": recipe.model_preset,
            "params_total": model.num_parameters(),
            "params_activated": model.num_parameters(activated=True),
            "params_mtp": model.num_parameters(include_mtp=True) - model.num_parameters(),
            "layers": c.num_hidden_layers,
            "dense_layers": c.first_k_dense_replace,
            "routed_experts": c.n_routed_experts,
            "experts_per_token": c.num_experts_per_tok,
            "shared_experts": c.n_shared_experts,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
        },
        "mtp": {"enabled": recipe.mtp_weight > 0, "weight": recipe.mtp_weight},
        "stage_seconds": {k2: v["wall_s"] for k2, v in stages.items()},
        "total_minutes": total_s / 60,
        "cost_usd": total_s / 3600 * recipe.usd_per_hour,
        "usd_per_hour": recipe.usd_per_hour,
        "training": train,
        "eval_n": rows["grpo"]["n"],
        "k": k,
        "stages": rows,
        "reasoning_signature": reasoning_signature(rows["sft"]["levels"], rows["grpo"]["levels"], MULTI_DIGIT_LEVELS),
        "figures": FIGURES,
    }


SAME = 0.01  # changes in the share that reasons within 1 point of each other count as equal (~1.5 problems a level)


def reasoning_signature(sft: dict[str, dict], grpo: dict[str, dict], multi_digit: list[str]) -> dict[str, Any]:
    """R1's signature, measured: how GRPO changed the share of greedy completions that reason, and their length, on
    the multi-digit levels (where reasoning should pay) against the one-digit ones; whether reasoning pays there
    (accuracy with steps vs answer-only, the SFT and GRPO evaluations pooled); and a sentence that says so.
    `sft`, `grpo`: report.json's per-level rows (think_rate, mean_length, steps and answer_only [n, correct])."""
    out: dict[str, Any] = {}
    for name, group in (
        ("multi_digit", [lv for lv in sft if lv in grpo and lv in multi_digit]),
        ("one_digit", [lv for lv in sft if lv in grpo and lv not in multi_digit]),
    ):
        acc = {}
        for kind in ("steps", "answer_only"):
            n, right = (sum(row[lv][kind][i] for row in (sft, grpo) for lv in group) for i in (0, 1))
            acc[kind] = right / n if n else None
        out[name] = {
            "levels": group,
            "think_change": _mean([grpo[lv]["think_rate"] - sft[lv]["think_rate"] for lv in group]),
            "length_change": _mean([grpo[lv]["mean_length"] - sft[lv]["mean_length"] for lv in group]),
            "steps_accuracy": acc["steps"],
            "answer_only_accuracy": acc["answer_only"],
            "pays": None if None in acc.values() else acc["steps"] > acc["answer_only"],
        }
    out["sentence"] = signature_sentence(out["multi_digit"], out["one_digit"])
    return out


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def signature_sentence(hard: dict[str, Any], easy: dict[str, Any]) -> str:
    """One sentence with the numbers: did GRPO raise the share that reasons more on the multi-digit levels (`hard`)
    than on the one-digit ones (`easy`), and does reasoning pay there? Groups as `reasoning_signature` measures them."""
    if hard["think_change"] is None or easy["think_change"] is None:
        return "The evaluation holds only one kind of level (multi-digit or one-digit): there is nothing to compare."
    dh, de = hard["think_change"], easy["think_change"]
    said = (
        f"GRPO changed the share of greedy completions that reason by {100 * dh:+.1f} points on the multi-digit "
        f"levels ({', '.join(hard['levels'])}) and by {100 * de:+.1f} on the one-digit ones ({', '.join(easy['levels'])})"
    )
    if hard["pays"] is None:
        missing = "answer-only completion" if hard["answer_only_accuracy"] is None else "completion that writes steps"
        said += f"; whether reasoning pays on the multi-digit levels is not measured (no {missing} there)"
    else:
        a, b = _pct(easy["steps_accuracy"]), _pct(easy["answer_only_accuracy"])
        one_digit = "" if easy["pays"] is None else f"; one-digit levels: {a}% vs {b}%"
        said += (
            f"; reasoning {'pays' if hard['pays'] else 'does not pay'} on the multi-digit levels (there, completions "
            f"that write steps were right {_pct(hard['steps_accuracy'])}% of the time, answer-only ones "
            f"{_pct(hard['answer_only_accuracy'])}%, after SFT and GRPO together{one_digit})"
        )
    verdict = "not R1's signature"
    if dh - de >= SAME and dh > 0:
        trend = "GRPO raised reasoning more on the multi-digit levels than on the one-digit ones"
        verdict = {True: "R1's signature", None: "R1's signature if reasoning pays there", False: verdict}[hard["pays"]]
    elif dh - de >= SAME:
        trend = "reasoning did not grow on the multi-digit levels, it only fell less there than on the one-digit ones"
    elif dh - de > -SAME:
        trend = "GRPO moved the share that reasons about equally on both kinds of level"
    else:
        trend = "GRPO moved reasoning away from the multi-digit levels, towards the one-digit ones"
    return f"{said}; {trend}: {verdict}."


def write_report(
    out: Path, recipe: Recipe, preset: str, stages: dict[str, dict], evals: dict[str, dict]
) -> dict[str, Any]:
    """report.json, report.md and plots/ in the run folder; returns the report (report.json's content)."""
    report = build_report(out, recipe, preset, stages, evals)
    mtp = None
    if report["mtp"]["enabled"]:
        mtp = mtp_acceptance(out, recipe)
        report["mtp"]["acceptance_rate"] = mtp
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    try:
        plot_report(out, report)
    except Exception as e:  # a plotting problem must not hide the result
        print(f"warning: could not draw the report's plots: {e}")
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _signature_section(r: dict[str, Any]) -> list[str]:
    """report.md's "R1's signature": the measured sentence, the per-level table and the figure over GRPO steps."""
    sft, grpo = r["stages"]["sft"]["levels"], r["stages"]["grpo"]["levels"]

    def change(lv: str, key: str, scale: float) -> str:
        a, b = scale * sft[lv][key], scale * grpo[lv][key]
        return f"{a:.1f} -> {b:.1f} ({b - a:+.1f})"

    def pooled(lv: str, kind: str) -> str:
        n, right = sft[lv][kind][0] + grpo[lv][kind][0], sft[lv][kind][1] + grpo[lv][kind][1]
        return f"{_pct(right / n)} of {n}" if n else "none"

    lines = [
        "## R1's signature",
        "",
        r["reasoning_signature"]["sentence"],
        "",
        "Per level, after SFT -> after GRPO (change); reasons = writes steps in `<think>`; the last column pools the "
        "greedy completions of both evaluations: % right of those that write steps / of the answer-only ones.",
        "",
        "| level | accuracy (%) | reasons (%) | length (tokens) | right with steps / answer-only (%) |",
        "|---|---|---|---|---|",
    ]
    for lv in (lv for lv in LEVEL_NAMES if lv in sft and lv in grpo):
        kind = "multi-digit" if lv in MULTI_DIGIT_LEVELS else "one-digit"
        lines.append(
            f"| {lv} ({kind}) | {change(lv, 'accuracy', 100)} | {change(lv, 'think_rate', 100)} | "
            f"{change(lv, 'mean_length', 1)} | {pooled(lv, 'steps')} / {pooled(lv, 'answer_only')} |"
        )
    png = "grpo_reasoning_by_level.png"
    return [*lines, "", f"![reasoning by level over GRPO steps](plots/{png})\n\n*{FIGURES[png]}*"]


def render_markdown(r: dict[str, Any]) -> str:
    s, m, t, k = r["stages"], r["model"], r["training"], r["k"]
    g = s["grpo"]["vs_previous"]
    lines = [
        "# nanoseek speedrun",
        "",
        f"{r['date']}, preset `{r['preset']}`: **{r['total_minutes']:.1f} minutes** on {r['machine']['cpu']} "
        f"({r['machine']['cores']} cores{', ' + r['machine']['gpu'] if 'gpu' in r['machine'] else ''}), "
        f"torch {r['machine']['torch']}; estimated cost ${r['cost_usd']:.3f} at ${r['usd_per_hour']:.2f}/hour.",
        "",
        f"Held-out greedy accuracy on {r['eval_n']:,} distinct `test` problems: "
        + " -> ".join(f"{STAGE_TITLES[x].lstrip('+ ')} **{_pct(s[x]['accuracy'])}%**" for x in STAGES)
        + f". GRPO vs the SFT model: {g['wrong_to_right']} problems wrong->right, {g['right_to_wrong']} right->wrong, "
        f"sign test p = {g['p_value']:.2g}.",
        "",
        f"![accuracy by stage](plots/accuracy_by_stage.png)\n\n*{FIGURES['accuracy_by_stage.png']}*",
        "",
        "## What was trained",
        "",
        f"A DeepSeek-V3-architecture model (`{m['preset']}`): {m['params_total'] / 1e6:.2f}M parameters, "
        f"{m['params_activated'] / 1e6:.2f}M activated per token; {m['layers']} layers ({m['dense_layers']} dense, "
        f"{m['layers'] - m['dense_layers']} MoE with {m['routed_experts']} routed experts, top-{m['experts_per_token']}, "
        f"+ {m['shared_experts']} shared), hidden {m['hidden_size']}, MLA, vocabulary {m['vocab_size']}; MTP "
        + (
            f"on (weight {r['mtp']['weight']})."
            if r["mtp"]["enabled"]
            else "off (not worth it at this size and length)."
        ),
        "",
        "| stage | what | steps | tokens | wall time | tokens/s | MFU | final loss | val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rec = r["recipe"]
    procs = f"{rec.get('processes', 1)} x " if rec.get("processes", 1) > 1 else ""  # batches count per process
    what = {
        "pretrain": f"all levels, {100 * rec.get('pretrain_worked_fraction', 1.0):.0f}% worked, the rest answer-only; "
        f"batch {procs}{rec['pretrain_batch']}, lr {rec['pretrain_lr']}, WSD",
        "sft": f"chat format; {100 * rec['worked_fraction']:.0f}% of completions worked, the rest answer-only "
        f"(R1's cold start), lr {rec['sft_lr']}",
        "grpo": f"{procs}{rec['grpo_prompts']} prompts x {rec['grpo_group']} samples, T {rec['grpo_temperature']}, "
        f"lr {rec['grpo_lr']}, reward = the verifier's 0/1 only",
    }
    for name in ("pretrain", "sft"):
        x = t[name]
        lines.append(
            f"| {name} | {what[name]} | {x['steps']:,} | {x['tokens'] / 1e6:.2f}M{'*' if name == 'sft' else ''} | "
            f"{x['wall_s']:.0f} s | {x['tokens_per_s']:,.0f} | {_pct(x['mfu'])}% | {x['train_loss']:.3f} | "
            f"{_num(x['val_loss'])} |"
        )
    x = t["grpo"]
    lines.append(
        f"| grpo | {what['grpo']} | {x['steps']:,} | {x['rollout_tokens'] / 1e6:.2f}M sampled | {x['wall_s']:.0f} s | "
        f"{x['tokens_per_s']:,.0f} sampled | - | - | - |"
    )
    other = {k2: v for k2, v in r["stage_seconds"].items() if k2 not in ("pretrain", "sft", "grpo")}
    lines += [
        "",
        "\\* SFT tokens are nominal (padded rows). Other stages: "
        + ", ".join(f"{k2} {v:.0f} s" for k2, v in other.items())
        + f". GRPO: rollouts took {100 * x['rollout_share']:.0f}% of the step time; mean reward "
        f"{x['reward_first_10pct']:.3f} -> {x['reward_last_10pct']:.3f} (first / last 10% of steps), groups with no "
        f"reward variance {100 * x['zero_variance_groups_first_10pct']:.0f}% -> "
        f"{100 * x['zero_variance_groups_last_10pct']:.0f}%, sampled length {x['response_len_first_10pct']:.1f} -> "
        f"{x['response_len_last_10pct']:.1f} tokens.",
        "",
        "## Held-out accuracy per stage",
        "",
        f"Greedy accuracy (%) per level; pass@{k} from {k} samples at T = 1 on a subset of "
        f"{s['grpo']['passk_n']} problems; format = one `<think>...</think>` block then an answer; "
        "steps = writes something inside `<think>`; sign test: flips against the previous stage on the same problems.",
    ]
    for name in STAGES:
        e = s[name]
        lines += ["", f"### {STAGE_TITLES[name]}", ""]
        if "vs_previous" in e:
            v = e["vs_previous"]
            lines += [
                f"vs {v['stage']}: {v['wrong_to_right']} wrong->right, {v['right_to_wrong']} right->wrong, "
                f"sign test p = {v['p_value']:.2g}.",
                "",
            ]
        lines += ["| level | n | accuracy | pass@" + str(k) + " |", "|---|---|---|---|"]
        for lv in LEVEL_NAMES:
            if lv in e["levels"]:
                lines.append(
                    f"| {lv} | {e['levels'][lv]['n']} | {_pct(e['levels'][lv]['accuracy'])} | "
                    f"{_pct(e['passk_levels'].get(lv))} |"
                )
        lines.append(f"| **all** | {e['n']} | **{_pct(e['accuracy'])}** | {_pct(e[f'pass@{k}'])} |")
        lines += [
            "",
            f"Format rate {_pct(e['format_rate'])}%, writes steps {_pct(e['think_rate'])}%, mean length "
            f"{e['mean_length']:.1f} tokens, sampled accuracy {_pct(e['sampled_accuracy'])}%.",
        ]
    lines += ["", *_signature_section(r)]
    lines += [
        "",
        "## Training curves",
        "",
        f"![GRPO](plots/grpo.png)\n\n*{FIGURES['grpo.png']}*",
        "",
        f"![loss](plots/loss.png)\n\n*{FIGURES['loss.png']}*",
        "",
        "## Expert load",
        "",
        f"![expert load](plots/expert_load.png)\n\n*{FIGURES['expert_load.png']}*",
        "",
        "Max / mean tokens per expert, per MoE layer (1.00 = balanced): "
        + "; ".join(f"{name} " + ", ".join(f"{max(row):.2f}" for row in s[name]["expert_load"]) for name in STAGES)
        + ". During pretraining (last step, aux-loss-free bias update): "
        + ", ".join(f"{v:.2f}" for v in t["pretrain"]["expert_max_over_mean"])
        + ".",
        "",
        "MTP: "
        + (
            f"acceptance rate {_pct(r['mtp'].get('acceptance_rate'))}% in self-speculative greedy decoding."
            if r["mtp"]["enabled"]
            else "off in this recipe (`--set mtp_weight=0.3` turns it on; the report then gives its acceptance rate)."
        ),
        "",
        "## Example conversations",
        "",
    ]
    for name in STAGES:
        lines += [f"### {STAGE_TITLES[name]}", ""]
        for ex in s[name]["examples"]:
            mark = "right" if ex["correct"] else f"wrong (answer {ex['answer']})"
            lines += [
                f"- **{ex['prompt']}** ({ex['level']}, {mark})",
                "",
                "  ```",
                f"  {ex['completion'].strip()}",
                "  ```",
                "",
            ]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        f"nanoseek speedrun --preset {r['preset']} --out runs/speedrun   # the recipe: recipe.json; stages: stages.json",
        "```",
        "",
        "Per-stage runs (metrics.jsonl, their own plots, checkpoints) are in `pretrain/`, `sft/`, `grpo/`; the "
        "per-problem results in `eval/`.",
    ]
    return "\n".join(lines) + "\n"
