"""lm-evaluation-harness adapter: `lm_eval --model nanoseek --model_args pretrained=DIR[,compile=True]`.

Scores and generations follow lm-eval's own `--model hf` (HFLM) request by request, so the two give the same
numbers on the same checkpoint: the same BOS rule when encoding, the same context/continuation split and rolling
windows (lm-eval's `TemplateLM` and utilities), greedy checks on the same positions, generations decoded without
special tokens and cut at the first stop sequence. What differs is the speed: scoring batches requests through
our forward pass and generation runs on our engine (latent cache, continuous batching, optionally compiled).

`lm_eval` finds the model by name because installing nanoseek installs `nanoseek_lm_eval.pth` (see
`nanoseek/_lm_eval_plugin.py`); `import nanoseek.eval.harness` registers it too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nanoseek.infer.engine import Engine, single_thread
from nanoseek.infer.sampling import SamplingParams


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    return bool(value)


@register_model("nanoseek")
class NanoseekLM(TemplateLM):
    """A nanoseek model directory as an lm-eval LM. Model args: pretrained (the directory), compile (compiled
    decode steps for generate_until), batch_size (requests per forward / engine batch), max_length (context;
    default max_position_embeddings), max_gen_toks (default 256, as HFLM), skip_special_tokens (default true, as
    HFLM decodes; false keeps `<think>` tags, as `nanoseek eval` scores), think_end_token (as HFLM: an id or text;
    only what follows its last occurrence is returned), dtype, device."""

    def __init__(
        self,
        pretrained: str,
        compile: bool | str = False,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        skip_special_tokens: bool | str = True,
        think_end_token: int | str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        path = Path(str(pretrained))
        if not (path / "config.json").is_file():
            raise ValueError(f"pretrained={pretrained}: not a model directory (no config.json)")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"pretrained={pretrained}: no tokenizer.json; lm-eval needs the model's tokenizer")
        if str(batch_size).startswith("auto"):  # HFLM's "auto[:N]": we have no probe, use a sensible fixed batch
            batch_size = int(max_batch_size or 16)
        self._batch_size = max(1, int(batch_size))
        torch_dtype = getattr(torch, str(dtype).removeprefix("torch.")) if dtype not in (None, "auto") else None
        dev = "cpu" if device in (None, "", "auto") else str(device)
        self.engine = Engine.from_pretrained(
            path, device=dev, dtype=torch_dtype, max_batch_size=self._batch_size, compile=_as_bool(compile)
        )
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer
        self._path = path
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.skip_special_tokens = _as_bool(skip_special_tokens)
        if isinstance(think_end_token, str) and think_end_token.isdigit():
            think_end_token = int(think_end_token)
        self.think_end_token = think_end_token
        self.add_bos_token = bool(self.tokenizer.config.get("add_bos_token", True))
        self._bos_text = self.tokenizer.bos_token

    # ------------------------------------------------------------------------------------- properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # as HFLM: BOS when the tokenizer has one

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def tokenizer_name(self) -> str:
        return str(self._path)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------------------------- tokens
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """HFLM's rule: BOS as the tokenizer adds it by default (add_bos_token), unless the text starts with it."""
        if add_special_tokens is None:
            bos = self.add_bos_token and not string.startswith(self._bos_text)
        else:
            bos = add_special_tokens
        ids = self.tokenizer.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None, **kwargs):
        """(sum of log p(continuation), whether it is the greedy continuation) per (key, context ids, continuation
        ids), over the last max_length tokens as HFLM truncates them.

        A request needs the logits of its input row (context + continuation minus the last token) only, and a
        causal model gives the same logits for a row's prefix, so requests share rows: every choice of a
        multiple-choice question whose answer is one token is scored from one row, and a row that is a prefix of
        another is scored from the longer one. Rows run longest first, right-padded, batch_size at a time."""
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("an lm-eval request has an empty continuation: nothing to score")
            ids = (context + continuation)[-(self.max_length + 1) :][:-1]
            rows.append((tuple(ids), tuple(continuation)))
        # lexicographic order puts every row right before the rows it is a prefix of: each unique row is served
        # by the longest row of its chain (the scan runs from the end, so owners are already resolved)
        keys = sorted({ids for ids, _ in rows})
        owner: dict[tuple, tuple] = {}
        for i in range(len(keys) - 1, -1, -1):
            k, nxt = keys[i], keys[i + 1] if i + 1 < len(keys) else None
            owner[k] = owner[nxt] if nxt is not None and nxt[: len(k)] == k else k
        served: dict[tuple, list[int]] = {}
        for r, (ids, _) in enumerate(rows):
            served.setdefault(owner[ids], []).append(r)
        todo = sorted(served, key=len, reverse=True)
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = override_bs or self.batch_size
        for start in range(0, len(todo), bs):
            batch = todo[start : start + bs]
            inp = torch.zeros(len(batch), len(batch[0]), dtype=torch.long)  # causal: right padding never reaches a row
            for b, key in enumerate(batch):
                inp[b, : len(key)] = torch.tensor(key)
            # small forwards on CPU run faster on one thread: waking a pool for tiny GEMMs costs more than it saves,
            # and stalls on a busy machine (8 x 128 tokens, hidden 64: 8 ms vs 50-200 ms on 2 shared cores)
            small = self.device.type == "cpu" and inp.numel() * self.model.config.hidden_size < 2**22
            with single_thread(small):
                logits = self.model(inp.to(self.device))
            for b, key in enumerate(batch):
                for r in served[key]:
                    ids, cont = rows[r]
                    n = len(cont)
                    lp = F.log_softmax(logits[b, len(ids) - n : len(ids)].float(), dim=-1)  # [n, V]
                    target = torch.tensor(cont, device=lp.device)
                    greedy = bool((lp.argmax(dim=-1) == target).all())
                    results[r] = (float(lp.gather(1, target[:, None]).sum()), greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in HFLM's disjoint rolling windows of max_length tokens."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for w in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, *w))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, scores):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """All requests go to the engine at once (continuous batching); greedy unless do_sample."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            params.append(
                SamplingParams(
                    max_tokens=max_gen,
                    temperature=float(kwargs.get("temperature") or 1.0) if sample else 0.0,
                    top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
                    top_k=int(kwargs.get("top_k") or 0) if sample else 0,
                    seed=kwargs.get("seed"),
                    stop=[s for s in until if s and s != eos],  # the engine stops at EOS by itself
                )
            )
            prompts.append(self.tok_encode(context, left_truncate_len=self.max_length - max_gen))
            stops.append(until)
        # a small model's GEMMs gain nothing from a thread pool and stall on a busy machine (see _loglikelihood_tokens)
        small = self.device.type == "cpu" and self.batch_size * self.model.config.hidden_size**2 < 2**22
        with single_thread(small):
            done_all = self.engine.generate(prompts, params)
        out = []
        think = self.think_end_token
        for req, done, until in zip(requests, done_all, stops):
            ids = done.token_ids
            if isinstance(think, int) and think in ids:  # HFLM: keep what follows the last think-end token
                ids = ids[len(ids) - ids[::-1].index(think) :]
            text = self.tok_decode(ids, skip_special_tokens=self.skip_special_tokens)
            if isinstance(think, int):
                text = text.lstrip()
            text = postprocess_generated_text(
                generation=text, stop=until, think_end_token=think if isinstance(think, str) else None
            )
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out
