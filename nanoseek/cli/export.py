"""`nanoseek export`: write a model in another format. `--format hf` (default): a training checkpoint, distributed
or not, as one Hugging Face model dir; `--format gguf`: a model dir as a GGUF file for llama.cpp / ollama."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanoseek.export.gguf import modelfile
from nanoseek.io import atomic_write_text

FORMATS = ("hf", "gguf")


def _cmd_export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        from nanoseek.export.hf import export_checkpoint

        if not args.checkpoint:
            raise ValueError("--format hf needs --checkpoint RUN/checkpoints/step_N (from train, sft or grpo)")
        print(f"wrote {export_checkpoint(args.checkpoint, args.out)}")
    elif args.format == "gguf":
        from nanoseek.export.gguf import export_gguf

        if args.model is None:
            raise ValueError("--format gguf needs --model DIR (a model directory with tokenizer.json)")
        out = Path(args.out)
        if out.suffix != ".gguf":
            raise ValueError(f"--out {out}: name the file FILE.gguf")
        export_gguf(args.model, out, dtype=args.dtype)
        atomic_write_text(out.with_name("Modelfile"), modelfile(out))
        mb = out.stat().st_size / 2**20
        print(f"wrote {out} ({args.dtype}, {mb:.1f} MiB) and {out.with_name('Modelfile')}")
        print(f"  llama.cpp: llama-cli -m {out}")
        print(f"  ollama:    cd {out.parent} && ollama create NAME -f Modelfile && ollama run NAME")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="a checkpoint -> one HF model dir (--format hf), or a model dir -> GGUF for llama.cpp / ollama",
        epilog="example: nanoseek export --checkpoint runs/pt/checkpoints/step_200 --out my-model\n"
        "          nanoseek export --format gguf --model my-model --out my-model.gguf --dtype q8_0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--format", choices=FORMATS, default="hf", help="hf (default) or gguf")
    p.add_argument("--checkpoint", help="hf: RUN/checkpoints/step_N (from train, sft or grpo; any world size)")
    p.add_argument(
        "--model",
        help="gguf: model directory (HF layout, with tokenizer.json); V2/V3 -> llama.cpp's deepseek2, V3.2 -> "
        "deepseek32, V4 -> deepseek4",
    )
    p.add_argument("--out", required=True, help="hf: output model directory; gguf: output file FILE.gguf")
    p.add_argument(
        "--dtype",
        default="f32",
        choices=("f32", "f16", "bf16", "q8_0"),
        help="weight type (norms, routers, expert biases and V4's mHC / compressor tensors stay f32; q8_0 rows not a "
        "multiple of 32 are f16)",
    )
    p.set_defaults(func=_cmd_export)
