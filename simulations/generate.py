"""`fedpriv generate RUN_DIR --prompt TEXT`: write with a finished run's character language model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="write text with a run's character language model",
                              description="Sample characters from the model a shakespeare run trained "
                                          "(ngram, lstm or transformer). Generated text is post-processing of the "
                                          "trained model: it costs no privacy beyond what the run spent.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run (config.toml, model.pt)")
    p.add_argument("--prompt", default=None,
                   help="text to continue (characters of the vocabulary only; default: a line of Romeo's)")
    p.add_argument("--length", type=int, default=300, help="characters to write (default 300)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = most likely character; higher = bolder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perplexity", type=int, default=0, metavar="N",
                   help="also print perplexity on N windows no client trained on (held-out roles)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    # Here, not at import: the generator needs torch, which building the command line should not pay for.
    from common.textgen import DEFAULT_PROMPT, generate, held_out_windows, load_run_model, perplexity

    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    run = load_run_model(args.run_dir)
    text = generate(run.model, prompt, args.length, args.temperature, args.seed)
    print(prompt + text)
    if args.perplexity > 0:
        x, y, what = held_out_windows(run.run_config, args.perplexity)
        print(f"\nperplexity {perplexity(run.model, x, y):.3f} on {len(y)} windows of {what}")
    return 0
