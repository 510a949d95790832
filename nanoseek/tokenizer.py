"""Byte-level BPE tokenizer with DeepSeek-V3 special tokens, split rules and an R1-style chat template.

A tokenizer is a plain Hugging Face `tokenizer.json` + `tokenizer_config.json` pair, so our saved
directories load in `transformers.AutoTokenizer` and DeepSeek checkpoints' tokenizers load here.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.io import atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
# DeepSeek-V3's tool-call tokens, spelled as its tokenizer and chat templates spell them.
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
TOOL_OUTPUTS_END = "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS = [
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_SEP,
    TOOL_OUTPUTS_BEGIN,
    TOOL_OUTPUTS_END,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
]
# Order fixes the ids: BOS=0, EOS=1, pad=2 as in DeepSeek-V3 and our ModelConfig defaults. The tool tokens come
# last (7-15), so tokenizers saved before them keep every id they have.
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END, *TOOL_TOKENS]

# DeepSeek-V3's tokenizer.json split rules (llama.cpp: `deepseek-v3` pre-tokenizer).
DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]

# Tool definitions, rendered into the system prompt under the headings DeepSeek-V3.1's model card gives them
# (`## Tools`, `### name`, `Description:`, `Parameters:` + the JSON schema). `tools` is the OpenAI list
# ({"type": "function", "function": {...}}), as transformers passes it to a template; bare functions work too.
TOOLS_TEMPLATE = (
    "{% if tools %}"
    "{% if system %}{{ '\\n\\n' }}{% endif %}"
    "{{ '## Tools\\nYou have access to the following tools:\\n' }}"
    "{% for tool in tools %}"
    "{% set f = tool['function'] if tool['function'] is defined else tool %}"
    "{{ '\\n### ' + f['name'] + '\\nDescription: ' + (f['description'] or '') + '\\n\\nParameters: ' }}"
    "{{ (f['parameters'] or {}) | tojson }}{{ '\\n' }}"
    "{% endfor %}"
    "{% endif %}"
)

# R1-style template with DeepSeek-V3's tool calls. System text (then the tools) goes right after BOS with no role
# tag; each assistant turn ends with EOS. As in R1, the reasoning of *earlier* assistant turns is dropped (history
# is answers only); the last assistant message is kept whole so SFT targets keep their `<think>` trace.
# The generation prompt is plain `<｜Assistant｜>` (not R1's `<｜Assistant｜><think>\n`): our SFT
# targets start with `<think>`, so the model opens the think block itself. With `thinking=false`
# (DeepSeek-V3.1's switch) the prompt closes an empty block for it: `<｜Assistant｜><think></think>`.
# Tool calls and results as DeepSeek-V3-0324's template writes them: an assistant turn's content is followed by
# `<｜tool▁calls▁begin｜>`, one `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>` a
# call (newline between calls), `<｜tool▁calls▁end｜>`, EOS. A run of `tool` messages is
# `<｜tool▁outputs▁begin｜>` + `<｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜>` each + `<｜tool▁outputs▁end｜>`,
# and the assistant's answer follows with no role tag (so a prompt ending in tool results ends there). Unlike
# that template, every assistant turn with calls opens with `<｜Assistant｜>` and every run of results opens
# with `<｜tool▁outputs▁begin｜>` (its namespace flags are never reset, so later rounds lose them).
CHAT_TEMPLATE = (
    "{% set system = messages | selectattr('role', 'equalto', 'system')"
    " | map(attribute='content') | join('\\n\\n') %}"
    "{{ bos_token }}{{ system }}" + TOOLS_TEMPLATE + "{% set ns = namespace(outputs=false) %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.outputs = false %}{% endif %}"
    "{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% set content = m['content'] or '' %}"
    "{% if not loop.last and '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.outputs = false %}"
    "{% else %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{{ content }}"
    "{% if m['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}"
    "{% for call in m['tool_calls'] %}"
    "{% set f = call['function'] %}"
    "{% set args = f['arguments'] if f['arguments'] is string else f['arguments'] | tojson %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + (call['type'] or 'function') + '<｜tool▁sep｜>' + f['name'] }}"
    "{{ '\\n```json\\n' + args + '\\n```<｜tool▁call▁end｜>' }}"
    "{% endfor %}"
    "{{ '<｜tool▁calls▁end｜>' }}{% endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if not ns.outputs %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.outputs = true %}{% endif %}"
    "{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{% elif m['role'] != 'system' %}{{ raise_exception('unknown role: ' + m['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt %}{% if not ns.outputs %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{% if thinking is defined and not thinking %}{{ '<think></think>' }}{% endif %}{% endif %}"
)

DEFAULT_VOCAB_SIZE = 4096


def _deepseek_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in DEEPSEEK_V3_SPLITS]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    """transformers' `tojson` for templates: plain json.dumps, not jinja2's HTML-escaping one, so a template
    renders the same text here and in `AutoTokenizer.apply_chat_template`."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte -> printable character table used by ByteLevel, inverted (char -> byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_chars()


def multi_digit_tokens(tokenizer: Tokenizer) -> list[str]:
    """Vocabulary entries (not special tokens) whose text holds two or more numeric characters."""
    byte_of = _byte_level_chars()
    out = []
    for token in tokenizer._tk.get_vocab(with_added_tokens=False):
        if any(c not in byte_of for c in token):  # special tokens kept as plain text
            continue
        text = bytes(byte_of[c] for c in token).decode("utf-8", errors="replace")
        if sum(unicodedata.category(ch).startswith("N") for ch in text) >= 2:
            out.append(token)
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its config (special tokens, chat template)."""

    def __init__(self, tk: HFTokenizer, config: dict | None = None):
        self._tk = tk
        self.config = dict(config or {})
        self.chat_template: str = self.config.get("chat_template") or CHAT_TEMPLATE
        self.bos_token = self._token_name("bos_token", BOS)
        self.eos_token = self._token_name("eos_token", EOS)
        self.pad_token = self._token_name("pad_token", PAD)
        self.bos_id = self._require_id(self.bos_token)
        self.eos_id = self._require_id(self.eos_token)
        pad_id = tk.token_to_id(self.pad_token)
        self.pad_id: int = self.eos_id if pad_id is None else pad_id  # DeepSeek configs pad with EOS
        # Absent (None) in tokenizers that predate R1, e.g. the very first DeepSeek-V3 release.
        self.user_id: int | None = tk.token_to_id(USER)
        self.assistant_id: int | None = tk.token_to_id(ASSISTANT)
        self.think_start_id: int | None = tk.token_to_id(THINK_START)
        self.think_end_id: int | None = tk.token_to_id(THINK_END)
        # Absent in tokenizers saved before tool calling: their markers are then plain text (many tokens).
        self.tool_calls_begin_id: int | None = tk.token_to_id(TOOL_CALLS_BEGIN)
        self.tool_calls_end_id: int | None = tk.token_to_id(TOOL_CALLS_END)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        self._env = env
        self._template = env.from_string(self.chat_template)

    def _token_name(self, key: str, default: str) -> str:
        value = self.config.get(key) or default
        return value["content"] if isinstance(value, dict) else value  # HF writes AddedToken dicts

    def _require_id(self, token: str) -> int:
        i = self._tk.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no token {token!r}: set bos_token/eos_token in tokenizer_config.json")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding tokenizer.json (+ tokenizer_config.json), or a tokenizer.json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {file}: pass a directory with tokenizer.json or the file itself "
                "(train one with `nanoseek tokenizer train --out DIR --builtin`)"
            )
        try:
            tk = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{file} is not a valid tokenizer.json ({e})") from e
        config = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        template_file = file.parent / "chat_template.jinja"  # newer transformers save it separately
        if not config.get("chat_template") and template_file.is_file():
            config["chat_template"] = template_file.read_text(encoding="utf-8")
        if isinstance(config.get("chat_template"), list):  # [{"name": ..., "template": ...}] form
            named = {t["name"]: t["template"] for t in config["chat_template"]}
            config["chat_template"] = named.get("default", next(iter(named.values()), None))
        return cls(tk, config)

    def tokenizer_config(self) -> dict:
        """tokenizer_config.json contents: what AutoTokenizer needs to load and chat with us."""
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
        }
        config.update({k: v for k, v in self.config.items() if k not in ("chat_template",)})
        config["chat_template"] = self.chat_template
        return config

    def to_json(self) -> str:
        return self._tk.to_str(pretty=True)

    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into out_dir (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.to_json())
        atomic_write_text(
            out / "tokenizer_config.json", json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False)
        )

    def hash(self) -> str:
        """sha256 of the tokenizer.json we write: changes whenever vocab, merges or rules change."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """Encode many texts at once; the Rust backend spreads them over all cores."""
        head, tail = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [head + e.ids + tail for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` stands for (byte-level pieces mapped back; added tokens as their UTF-8 text)."""
        piece = self._tk.id_to_token(int(i)) or ""
        byte_of = _BYTE_OF
        if all(ch in byte_of for ch in piece):
            return bytes(byte_of[ch] for ch in piece)
        return piece.encode("utf-8")

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None, **kwargs
    ) -> str:
        """Render messages ({"role": "system"|"user"|"assistant"|"tool", "content": str, assistant "tool_calls"})
        as one string. `tools`: OpenAI tool definitions, rendered into the system prompt. `kwargs` are template
        variables, as transformers passes them (`thinking=False`: the reply skips its think block)."""
        return self._template.render(
            **kwargs,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> list[int]:
        # The template emits BOS itself, so no extra special tokens here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))

    @property
    def renders_tool_calls(self) -> bool:
        """Whether the chat template knows assistant `tool_calls` (ours and DeepSeek-V3's since 0324 do)."""
        return "tool_calls" in self.chat_template

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders `tools` itself (DeepSeek's own expect them in the system prompt)."""
        return "tools" in meta.find_undeclared_variables(self._env.parse(self.chat_template))

    def render_tools(self, tools: list[dict]) -> str:
        """The tool definitions as our template writes them into the system prompt (`TOOLS_TEMPLATE`): what a
        server adds to the system message for templates that do not render `tools`."""
        return self._env.from_string(TOOLS_TEMPLATE).render(tools=tools, system="")


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, tools: bool = True) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek-V3 split rules and single-digit number tokens.

    The vocabulary may come out smaller than vocab_size when the corpus has fewer useful merges. `tools=False`
    leaves out the nine tool-call tokens (a model that never calls tools; its server refuses `tools` by name).
    """
    special = SPECIAL_TOKENS if tools else [t for t in SPECIAL_TOKENS if t not in TOOL_TOKENS]
    min_size = 256 + len(special)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {min_size}")
    tk = HFTokenizer(models.BPE())
    # Training splits every digit apart, so BPE never learns a merge between two digits. At use
    # time we keep DeepSeek's `\p{N}{1,3}` split: a 1-3 digit group can then only be spelled one
    # digit per token, which is exactly what the digit split gives, so both rule sets tokenize
    # identically and tokenizer.json stays DeepSeek-V3 compatible (llama.cpp `deepseek-v3`).
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _deepseek_pre_tokenizer()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tk.pre_tokenizer = _deepseek_pre_tokenizer()
    tk.decoder = decoders.ByteLevel()
    # Plain `tokenizer(text)` in transformers adds BOS, as DeepSeek's add_bos_token=true does.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    tokenizer = Tokenizer(tk)
    bad = multi_digit_tokens(tokenizer)
    if bad:  # guards the compatibility argument above
        raise RuntimeError(f"tokenizer learned multi-digit tokens {bad[:5]}")
    return tokenizer
