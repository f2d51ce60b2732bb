"""`fedpriv generate RUN_DIR --prompt TEXT`: write with a finished run's character language model."""

from __future__ import annotations

import argparse

from client.textgen import DEFAULT_PROMPT, POST_PROCESSING, generate, held_out_windows, load_run_model, perplexity


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="write text with a run's character language model",
                              description="Sample characters from the model a shakespeare run trained "
                                          "(lstm or transformer). " + POST_PROCESSING)
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of a finished run (config.toml, model.pt)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue (characters of the vocabulary only)")
    p.add_argument("--length", type=int, default=300, help="characters to write (default 300)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = most likely character; higher = bolder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perplexity", type=int, default=0, metavar="N",
                   help="also print perplexity on N windows no client trained on (held-out roles)")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    run = load_run_model(args.run_dir)
    text = generate(run.model, args.prompt, args.length, args.temperature, args.seed)
    print(args.prompt + text)
    if args.perplexity > 0:
        x, y, what = held_out_windows(run.run_config, args.perplexity)
        print(f"\nperplexity {perplexity(run.model, x, y):.3f} on {len(y)} windows of {what}")
    return 0
