"""`megacpt tokenizer train | extend`: a SentencePiece BPE model from jsonl/txt documents, or a model's
vocabulary extended with pieces of a new corpus: a SentencePiece .model or a Hugging Face BPE tokenizer.json
(the work is in sentencepiece_training.py, vocab_extension.py and bpe_extension.py)."""
from __future__ import annotations

import argparse

from megacpt.data.bpe_extension import bpe_tokens_per_byte, extend_bpe
from megacpt.data.sentencepiece_training import train_sentencepiece
from megacpt.data.vocab_extension import extend_tokenizer

INPUT_HELP = ("documents: .jsonl, .jsonl.gz, .jsonl.zst (one JSON object per line), .parquet (one per row) or .txt "
              "(one document per file)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train a SentencePiece BPE model (PREFIX.model, PREFIX.vocab)",
                               description="Train a SentencePiece BPE model from jsonl/txt documents.")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="pieces in the model, including 256 byte pieces, unk and eos")
    train.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    train.add_argument("--keep-whitespace", action="store_true",
                       help="keep the text as it is (for code): newlines and runs of spaces survive encode/decode, "
                            "instead of SentencePiece's default normalisation, which folds them into one space")
    extend = actions.add_parser(
        "extend", help="append pieces of a new corpus to a SentencePiece model or a BPE tokenizer.json, keeping "
                       "every existing id",
        description="Train pieces on a new corpus and append up to N that the base model lacks; ids 0..V-1 keep "
                    "their pieces.")
    extend.add_argument("--base", required=True, metavar="MODEL",
                        help="the SentencePiece .model, or the Hugging Face BPE tokenizer.json (Llama 3, Qwen2), to "
                             "extend")
    extend.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    extend.add_argument("--add", type=int, required=True, metavar="N",
                        help="append at most N pieces (at least 1)")
    extend.add_argument("--output", required=True, metavar="PREFIX",
                        help="writes PREFIX.model and PREFIX.vocab; for a tokenizer.json base, the tokenizer.json to "
                             "write (the base's tokenizer_config.json is copied next to it)")
    for action in (train, extend):
        action.add_argument("--json-key", default="text", metavar="KEY",
                            help="key of the document text in each jsonl line (default: text)")
        action.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model/.vocab")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        model = train_sentencepiece(args.input, args.vocab_size, args.output, json_key=args.json_key,
                                    overwrite=args.overwrite, keep_whitespace=args.keep_whitespace)
        print(f"tokenizer: wrote {model} and {args.output}.vocab ({args.vocab_size} pieces, EOD id 1)")
        return 0
    if args.base.endswith(".json"):
        base_size, added = extend_bpe(args.base, args.input, args.add, args.output, json_key=args.json_key,
                                      overwrite=args.overwrite)
        print(f"tokenizer: wrote {args.output}: {added} tokens added ({base_size} -> {base_size + added}; "
              f"{args.add} asked)")
        before, after = (bpe_tokens_per_byte(f, args.input, args.json_key) for f in (args.base, args.output))
        print(f"tokens per byte of {', '.join(args.input)}: {before:.4f} before, {after:.4f} after")
        return 0
    result = extend_tokenizer(args.base, args.input, args.add, args.output, json_key=args.json_key,
                              overwrite=args.overwrite)
    print(f"tokenizer: wrote {result.model} and {args.output}.vocab: {result.added} pieces added "
          f"({result.base_size} -> {result.base_size + result.added}; {args.add} asked)")
    print(f"tokens per byte of {', '.join(args.input)}: {result.tokens_per_byte_before:.4f} before, "
          f"{result.tokens_per_byte_after:.4f} after")
    return 0
