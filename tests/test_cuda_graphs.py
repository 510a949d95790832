"""benchmarks/cuda_graphs.py: the static decode loop that a CUDA graph captures (fixed shapes, the next token,
positions and output column kept on the device, the cache read to its full length) decodes what the eager engine
step and a plain full forward decode. Off CUDA nothing is captured, so this checks the loop, not the speed."""

from __future__ import annotations

import torch

from benchmarks.cuda_graphs import GraphDecode, measure
from benchmarks.cuda_graphs import main as bench_main
from nanoseek import ModelConfig, Transformer
from nanoseek.infer.cache import LatentCache
from nanoseek.infer.runner import single_thread


def _model(preset: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset(preset, num_nextn_predict_layers=0)).eval()


def test_static_loop_decodes_the_full_forwards_greedy_tokens():
    model = _model("tiny")
    prompts = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    cache = LatentCache(model.config, n_slots=3, max_len=9 + 12)
    with torch.no_grad(), single_thread():
        got = GraphDecode(model, cache, prompts, 12)()
        ids = prompts
        for _ in range(12):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, ids[:, 9:])


def test_measure_reports_both_loops_and_that_they_agree(capsys):
    with single_thread():
        row = measure(_model("tiny-v32"), batch=2, prompt_len=8, new_tokens=10, reps=1)
    assert row["bench"] == "static_decode" and row["identical"] and row["first_difference"] is None
    assert row["eager_tok_s"] > 0 and row["graph_tok_s"] > 0 and row["capture_s"] == 0.0
    bench_main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "1", "--new-tokens", "6"])
    assert '"batch": 1' in capsys.readouterr().out
