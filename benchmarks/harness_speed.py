"""lm-evaluation-harness: `--model nanoseek` (eager and compile=True) vs `--model hf` on the same checkpoint, one process.

    python -m benchmarks.harness_speed --model runs/speedrun/grpo/checkpoints/step_N [--n 50]

Three offline tasks written here from the built-in arithmetic test split, one per request type: multiple choice
(loglikelihood: the right answer among three wrong ones), rolling loglikelihood of worked solutions, and greedy
generation of answers in chat format scored by `nanoseek eval`'s checker (skip_special_tokens=False for ours, so
`<think>` survives; hf decodes without special tokens, so its accuracy there is not comparable and not reported).
Batch size 16 for all. hf and eager nanoseek run --rounds times, alternating, and each reports its fastest round
per field (a busy moment on a shared machine then decides nothing); compile=True (unless --no-compile) runs twice
(the first compiles every decode shape, the second finds them in inductor's on-disk cache). Seconds: `total` (model
load + evaluation) and per request type (inside the LM's methods). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_name

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_tasks(d: Path, n: int, chat_prefix: str, chat_suffix: str) -> list[str]:
    from nanoseek.tasks.problems import generate

    problems = generate("arithmetic", n, seed=3, split="test", level="3x12")
    rows = []
    for i, p in enumerate(problems):
        a = int(p.answer)
        choices = [str(a), str(a + 1 + i % 3), str(a - 2 - i % 5), str(a * 2 + 1)]
        rows.append({"question": p.prompt, "choices": choices, "label": 0})
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": p.pretrain_text()}) + "\n" for p in problems))
    (d / "gen.jsonl").write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    common = "dataset_path: json\ntest_split: test\n"

    def data(name: str) -> str:
        return f"dataset_kwargs:\n  data_files:\n    test: {d / name}\n"

    (d / "nb_mc.yaml").write_text(
        f"task: nb_mc\n{common}{data('mc.jsonl')}output_type: multiple_choice\n"
        "doc_to_text: '{{question}} Answer:'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    (d / "nb_ppl.yaml").write_text(
        f"task: nb_ppl\n{common}{data('ppl.jsonl')}output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
    )
    (d / "nb_gen.yaml").write_text(
        f"task: nb_gen\n{common}{data('gen.jsonl')}output_type: generate_until\n"
        f"doc_to_text: '{chat_prefix}{{{{prompt}}}}{chat_suffix}'\ndoc_to_target: '{{{{answer}}}}'\n"
        "generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: 96\n"
        "process_results: !function nb_utils.process_results\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (d / "nb_utils.py").write_text(
        "from nanoseek.tasks.verify import is_correct, to_item\n\n\n"
        "def process_results(doc, results):\n"
        "    return {'acc': float(is_correct(to_item({'prompt': doc['prompt'], 'answer': doc['answer']}), results[0]))}\n"
    )
    return ["nb_mc", "nb_ppl", "nb_gen"]


def run(model: str, model_args: str, task_dir: Path, tasks: list[str]) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = get_model(model).create_from_arg_string(model_args, {"batch_size": 16, "device": "cpu"})
    spent: dict = {}
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):

        def timed(*a, _f=getattr(lm, name), _n=name, **k):  # noqa: B008
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_n] = round(time.perf_counter() - t, 3)

        setattr(lm, name, timed)
    out = simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False)
    )
    spent["total"] = round(time.perf_counter() - t0, 2)
    res = out["results"]
    spent["mc_acc"] = round(res["nb_mc"]["acc,none"], 4)
    spent["word_perplexity"] = round(res["nb_ppl"]["word_perplexity,none"], 4)
    if model == "nanoseek":
        spent["gen_acc"] = round(res["nb_gen"]["acc,none"], 4)
    return spent


def main() -> None:
    import lm_eval

    import nanoseek.eval.harness  # noqa: F401  registers --model nanoseek (the CLI uses the installed hook)
    from nanoseek.tokenizer import ASSISTANT, USER, Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--n", type=int, default=50, help="problems per task")
    p.add_argument("--rounds", type=int, default=2, help="alternating hf / nanoseek rounds (fastest kept)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="also run compile=True")
    args = p.parse_args()
    tok = Tokenizer.from_pretrained(args.model)
    assert tok.user_id is not None
    with tempfile.TemporaryDirectory() as d:
        tasks = write_tasks(Path(d), args.n, USER, ASSISTANT)
        result = {"bench": "lm_eval_harness", "model": args.model, "problems_per_task": args.n}
        for _ in range(max(1, args.rounds)):
            for name, model_args in (
                ("hf", f"pretrained={args.model},dtype=float32"),
                ("nanoseek", f"pretrained={args.model},skip_special_tokens=False"),
            ):
                r = run(name, model_args, Path(d), tasks)
                result[name] = {k: min(v, result[name][k]) if name in result else v for k, v in r.items()}
        if args.compile:
            compiled = f"pretrained={args.model},skip_special_tokens=False,compile=True"
            result["nanoseek_compile"] = run("nanoseek", compiled, Path(d), tasks)  # includes compiling each shape
            result["nanoseek_compile_again"] = run("nanoseek", compiled, Path(d), tasks)  # inductor's disk cache warm
    for name in ("nanoseek", "nanoseek_compile", "nanoseek_compile_again"):
        if name in result:
            result[f"speedup_{name}"] = round(result["hf"]["total"] / result[name]["total"], 2)
            requests = ("loglikelihood", "loglikelihood_rolling", "generate_until")
            hf_req, our_req = (sum(result[k][q] for q in requests) for k in ("hf", name))
            result[f"request_speedup_{name}"] = round(hf_req / our_req, 2)
    result.update(
        lm_eval=lm_eval.__version__,
        torch=torch.__version__,
        machine=f"{cpu_name()}, {torch.get_num_threads()} threads",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
