"""``diffusers-unlearn bench``: the paper's continual-unlearning experiment on MiniCanvas.

A stream of removal requests (default: the paper's protocol, 12 styles, one family after another; with
--domain object, 6 objects) is served under every protocol (sequential, simultaneous, L1, L2,
selective fine-tuning, TIES merging, gradient projection and its combinations); UA, IRA and CRA are measured after
every request, plus the UA of the removed concepts in held-out wordings. Writes results.md, results.json,
metrics.png, cost.png and ua_matrix.png (per-concept UA after every request) into --out.

--stream NAME serves a named stream that mixes styles and objects instead (mixed36: 30 styles and 6 objects
interleaved), scored after every --every K requests and the last: UA over everything removed so far and per domain,
IRA over the stream's kept styles, CRA over its kept objects (none of them protected), held-out UA and what the
removed concepts' prompts keep of the other domain.
"""

from __future__ import annotations

import argparse
import ast
import functools
import os
import shlex
import time
from pathlib import Path
from typing import Any

from . import UsageError
from ._common import dataclass_defaults, default_text, finite_float, module_constant, set_quiet

# --quick: the same code path, small enough for CI (a couple of minutes on 2 CPU cores).
QUICK = {"requests": 2, "steps": 4, "eval_seeds": 1, "eval_objects": 2, "eval_families": 2, "eval_steps": 10}
# --quick with --stream: the first requests of the stream, enough to reach both domains (mixed36: 2 styles, 1 object)
QUICK_STREAM_REQUESTS = 3
# options of the one-domain bench that a named stream fixes itself (argparse dest -> flag)
STREAM_FIXED = {"order": "--order", "eval_objects": "--eval-objects", "eval_families": "--eval-families",
                "attacks": "--attacks", "attack_steps": "--attack-steps"}
# The paper's stream lengths: 12 style requests; object requests on MiniCanvas's 12 objects, half of them.
DEFAULT_REQUESTS = {"style": 12, "object": 6}
# Options that map onto Hyperparameters fields (argparse dest -> field).
HPARAM_OPTIONS = {
    "steps": "steps",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "rank": "rank",
    "l1_weight": "l1_weight",
    "l2_weight": "l2_weight",
    "selective_top_k": "selective_top_k",
    "gp_selective_top_k": "gp_selective_top_k",
    "gp_neighbors": "gp_neighbors",
    "merge_density": "merge_density",
    "merge_scale": "merge_scale",
    "preserve_weight": "preserve_weight",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    hp = dataclass_defaults("bench/protocols.py", "Hyperparameters")

    def default(name: str) -> str:
        return f"default {hp[name]}" if name in hp else "default: the bench's"

    protocols = ",".join(_protocol_names()) or "the protocols of bench/protocols.py"
    parser = subparsers.add_parser("bench", help="continual-unlearning benchmark on MiniCanvas (UA/IRA/CRA per "
                                   "request, table and plots)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"small run for CI: {QUICK['requests']} requests, {QUICK['steps']} steps, "
                        f"{QUICK['eval_seeds']} evaluation seed, {QUICK['eval_objects']} evaluated objects, "
                        f"{QUICK['eval_families']} style families, {QUICK['eval_steps']} sampling steps (explicit "
                        "options still win)")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"length of the removal stream (default {DEFAULT_REQUESTS['style']} styles, "
                        f"{DEFAULT_REQUESTS['object']} objects)")
    parser.add_argument("--domain", choices=["style", "object"], default="style")
    streams = ", ".join(_stream_names()) or "the streams of bench/streams.py"
    parser.add_argument("--stream", default=None,
                        help=f"serve a named stream that mixes styles and objects ({streams}) instead of --domain's; "
                        "--requests N: its first N requests")
    parser.add_argument("--every", type=int, default=None,
                        help="with --stream: score after every K requests and after the last (default 1: after "
                        "every request); the others record cost and drift only")
    parser.add_argument("--method", default="esd",
                        help="erasure method registered with du.register_objective (default esd); an unknown name is "
                        "refused with the registered list")
    parser.add_argument("--protocols", default="all",
                        help=f"comma-separated subset of: {protocols} (default all)")
    parser.add_argument("--eval-seeds", type=int, default=None,
                        help="evaluation seeds per prompt, the first N of MiniCanvas's EVAL_SEEDS (default 2)")
    parser.add_argument("--eval-objects", type=int, default=None,
                        help="draw the evaluated styles with the first N of the bench's evaluation objects only "
                        "(default: all of them; --domain object: all MiniCanvas objects)")
    parser.add_argument("--order", default=None,
                        help="removal order, comma-separated evaluated concepts of --domain (default: the paper's, "
                             "one style family after another; objects in MiniCanvas's order)")
    parser.add_argument("--eval-families", type=int, default=None,
                        help="evaluate (and remove) styles of the first N of MiniCanvas's 12 style families only "
                        "(default: all)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="sampling steps of the evaluation images and of the frozen model's trajectories "
                        "(default: MiniCanvas's recommended NUM_INFERENCE_STEPS)")
    parser.add_argument("--out", default="bench-results", help="output folder (default ./bench-results)")
    parser.add_argument("--weights-dir", default=None, help="MiniCanvas weights folder (default: the shipped one)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="protocols run in parallel worker processes, one torch thread each (default: the "
                        "number of CPU cores this process may use)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads with --jobs 1 (default: torch's choice; with --processes N, the "
                        "cores this process may use divided by N)")
    parser.add_argument("--processes", type=int, default=None,
                        help="share each evaluation's images out over N processes (relaunched with "
                        "torch.distributed.run; every process serves the same requests, and the scores equal one "
                        "process's); not with --jobs > 1 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="request k uses seed SEED + k")
    parser.add_argument("--negative-guidance", type=finite_float, default=None,
                        help=f"ESD's eta ({default_text('bench/runner.py', 'BenchSettings', 'negative_guidance')})")
    parser.add_argument("--reference", choices=("empty", "context"), default=None,
                        help="ESD's reference prediction: the empty prompt (ESD's own) or the prompt without the "
                             f"concept ({default_text('bench/runner.py', 'BenchSettings', 'reference')})")
    parser.add_argument("--anchor", default=None, help="Concept Ablation's anchor (default: a generic word)")
    group = parser.add_argument_group("per-request training (shared by every protocol)")
    group.add_argument("--steps", type=int, default=None,
                       help=f"steps per request ({default('steps')}{_by_method('steps')})")
    group.add_argument("--lr", type=finite_float, default=None,
                       help=f"learning rate ({default('learning_rate')}{_by_method('learning_rate')})")
    group.add_argument("--batch-size", type=int, default=None,
                       help=f"samples per step ({default('batch_size')})")
    group.add_argument("--rank", type=int, default=None, help=f"LoRA rank ({default('rank')})")
    group.add_argument("--l1-weight", type=finite_float, default=None, help=default("l1_weight"))
    group.add_argument("--l2-weight", type=finite_float, default=None, help=default("l2_weight"))
    group.add_argument("--selective-top-k", type=finite_float, default=None, help=default("selective_top_k"))
    group.add_argument("--gp-selective-top-k", type=finite_float, default=None,
                       help=default("gp_selective_top_k"))
    group.add_argument("--gp-neighbors", type=_neighbors, default=None,
                       help="concepts of the auxiliary set gradient projection protects besides earlier removals, "
                       "the K nearest to the target or 'all' (default: all)")
    group.add_argument("--merge-density", type=finite_float, default=None, help=default("merge_density"))
    group.add_argument("--merge-scale", type=finite_float, default=None, help="TIES lambda (default: grows with n)")
    group.add_argument("--preserve-weight", type=finite_float, default=None,
                       help="weight of a retain loss on the domain's kept concepts, trained methods only; 0: none "
                       f"({default('preserve_weight')}{_by_method('preserve_weight')})")
    parser.add_argument("--attacks", default=None,
                        help="recovery attacks after the last request, comma-separated (paraphrase, embedding, "
                        "finetune, rollback): adds robust-UA columns")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="optimisation steps of the embedding and finetune attacks (default: theirs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-request lines")
    parser.set_defaults(func=run)


def command_line(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> str:
    """The command that reproduces this run: every option that differs from its default."""
    parts = ["diffusers-unlearn", "bench"]
    if args.quick:
        parts.append("--quick")
    for key, value in vars(args).items():
        if key in ("func", "command", "debug", "quick", "quiet") or value == parser_defaults.get(key):
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def relaunch_argv(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> list[str]:
    """The arguments that run this bench again (every option that differs from its default, flags included)."""
    argv = ["--debug"] if getattr(args, "debug", False) else []
    argv.append("bench")
    for key, value in vars(args).items():
        if key in ("func", "command", "debug") or value == parser_defaults.get(key):
            continue
        flag = f"--{key.replace('_', '-')}"
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _relaunch(args: argparse.Namespace, processes: int) -> int:
    """Run this bench on ``processes`` processes (``torch.distributed.run``), each with its share of the cores."""
    import subprocess
    import sys

    env = dict(os.environ)
    if args.threads is None:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "-m", "diffusers_unlearn.cli", *relaunch_argv(args, _defaults())]
    return subprocess.run(command, env=env, check=False).returncode


def run(args: argparse.Namespace) -> int:
    from ._common import check_writable

    check_writable(args.out)
    from ..evaluation.distributed import launched_processes

    processes = 1 if args.processes is None else args.processes
    if processes < 1:
        raise UsageError(f"--processes must be >= 1, got {processes}")
    if processes > 1 and args.jobs is not None and args.jobs > 1:
        raise UsageError("--processes shares out each evaluation's images; --jobs runs protocols in workers: "
                         "use one of them")
    if processes > 1 and launched_processes() == 1:
        return _relaunch(args, processes)
    import torch

    from .. import bench
    from ..bench.report import headline
    from ..evaluation.distributed import evaluation_state

    # launched on several processes (--processes, accelerate launch, torch.distributed.run): the main one reports
    main_process = launched_processes() == 1 or evaluation_state().is_main_process
    if not main_process:
        import warnings

        warnings.simplefilter("ignore")  # the main process prints each warning once (inside main's catch_warnings)

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else {}

    def option(name: str, default: Any = None) -> Any:
        """An explicit option wins over --quick's preset, which wins over the default."""
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    fields: dict[str, Any] = {}
    for dest, name in HPARAM_OPTIONS.items():
        value = option(dest)
        if value is not None:
            fields[name] = None if value == "all" else value
    hparams = bench.method_hyperparameters(args.method, args.domain, **fields)
    eval_seeds = option("eval_seeds", 2)
    eval_objects = option("eval_objects")
    if eval_objects is not None and eval_objects < 1:
        raise UsageError(f"--eval-objects must be >= 1, got {eval_objects}")
    eval_steps = option("eval_steps")
    if eval_steps is not None and eval_steps < 1:
        raise UsageError(f"--eval-steps must be >= 1, got {eval_steps}")
    eval_families = option("eval_families")
    if eval_families is not None and eval_families < 1:
        raise UsageError(f"--eval-families must be >= 1, got {eval_families}")
    set_quiet(args.quiet or not main_process)
    if args.stream is not None:
        return _run_stream(args, fields, eval_seeds, eval_steps, main_process)
    if args.every is not None:
        raise UsageError("--every applies to --stream runs")
    from .. import minicanvas

    pool = list(bench.MINICANVAS_EVAL_OBJECTS) if args.domain == "style" else list(minicanvas.OBJECTS)
    try:
        world_factory = functools.partial(
            bench.minicanvas_world, weights_dir=args.weights_dir, eval_seeds=eval_seeds, eval_steps=eval_steps,
            eval_objects=None if eval_objects is None else pool[:eval_objects], domain=args.domain,
            eval_families=eval_families,
            order=None if args.order is None else [c.strip() for c in args.order.split(",") if c.strip()])
        world = world_factory()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    requests = option("requests", min(DEFAULT_REQUESTS[args.domain], len(world.orders[args.domain])))
    options = _method_options(args)
    settings = bench.BenchSettings(requests=requests, domain=args.domain, method=args.method,
                                   protocols=args.protocols, hparams=hparams, anchor=args.anchor, seed=args.seed,
                                   attacks=args.attacks, attack_steps=args.attack_steps, **options)
    world.stream(settings.domain, settings.requests)  # refuse an impossible stream before any work
    command = command_line(args, _defaults())
    started = time.perf_counter()
    jobs = _jobs(args, len(settings.protocols))
    quiet = args.quiet or not main_process
    result = bench.run_bench(world, settings, progress=not quiet, log=None if quiet else _write,
                             command=command, jobs=jobs, world_factory=world_factory)
    if not main_process:
        return 0
    paths = bench.write_report(result, args.out, title="MiniCanvas continual unlearning")
    print()
    print(f"After request {settings.requests} ({settings.domain}, {settings.method}; "
          f"{(time.perf_counter() - started) / 60:.1f} min):")
    print("\n".join(headline(result)))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method settings the flags set (``--negative-guidance``, ``--reference``), for the 12-request bench and
    the streams alike."""
    options: dict[str, Any] = {}
    if args.negative_guidance is not None:
        options["negative_guidance"] = args.negative_guidance
    if args.reference is not None:
        options["reference"] = args.reference
    return options


def _jobs(args: argparse.Namespace, protocols: int) -> int:
    """Worker processes for ``protocols`` protocols: ``--jobs``, or one per core and protocol; one when the bench is
    launched on several processes (they share out images, not protocols)."""
    from ..evaluation.distributed import launched_processes

    jobs = args.jobs if args.jobs is not None else min(len(os.sched_getaffinity(0)), protocols)
    if launched_processes() > 1:
        jobs = 1 if args.jobs is None else jobs
    if jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {jobs}")
    return jobs


def _run_stream(args: argparse.Namespace, fields: dict[str, Any], eval_seeds: int, eval_steps: int | None,
                main_process: bool) -> int:
    """``bench --stream NAME``: a named mixed stream on MiniCanvas (``bench.mixed``)."""
    from .. import bench

    fixed = [flag for dest, flag in STREAM_FIXED.items() if getattr(args, dest) is not None]
    if args.domain != "style":
        fixed.append("--domain")
    if fixed:
        raise UsageError(f"--stream {args.stream} fixes its own order, domains and evaluation set: drop "
                         f"{', '.join(fixed)}")
    every = 1 if args.every is None else args.every
    requests = args.requests if args.requests is not None else (QUICK_STREAM_REQUESTS if args.quick else None)
    options = _method_options(args)
    protocols = None if args.protocols == "all" else args.protocols
    try:
        hparams = {d: bench.method_hyperparameters(args.method, d, **fields) for d in ("style", "object")}
        settings = bench.StreamSettings(args.stream, requests=requests, every=every, method=args.method,
                                        protocols=protocols, hparams=hparams, anchor=args.anchor, seed=args.seed,
                                        **options)
        world_factory = functools.partial(bench.minicanvas_stream_world, args.stream, weights_dir=args.weights_dir,
                                          eval_seeds=eval_seeds, eval_steps=eval_steps)
        world = world_factory()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    command = command_line(args, _defaults())
    started = time.perf_counter()
    jobs = _jobs(args, len(settings.protocols))
    quiet = args.quiet or not main_process
    result = bench.run_stream_bench(world, settings, progress=not quiet, log=None if quiet else _write,
                                    command=command, jobs=jobs, world_factory=world_factory)
    if not main_process:
        return 0
    paths = bench.write_stream_report(result, args.out, title=f"MiniCanvas: stream {args.stream}")
    from ..bench.stream_report import stream_headline

    print()
    print(f"After request {len(result['requests'])} of stream {args.stream} "
          f"({(time.perf_counter() - started) / 60:.1f} min):")
    print("\n".join(stream_headline(result)))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _stream_names() -> list[str]:
    """The stream names of ``bench/streams.py`` (``Stream("name", ...)``), read without importing it."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "bench" / "streams.py").read_text(encoding="utf-8"))
    return [node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Stream" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]


def _protocol_names() -> list[str]:
    """The protocol names of ``bench/protocols.py``, read without importing it (``--help`` stays instant)."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "bench" / "protocols.py").read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Protocol" and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append(first.value)
    return names


def _neighbors(text: str) -> int | str:
    """--gp-neighbors: an integer >= 0, or "all" (every concept of the world)."""
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'all', got {text!r}")
    return value


def _by_method(field: str) -> str:
    """"; ca style: 300" for a help text: the methods and domains whose bench default differs
    (``bench.protocols.METHOD_TRAINING``)."""
    by_method = module_constant("bench/protocols.py", "METHOD_TRAINING")
    return "".join(f"; {method} {domain}: {values[field]}" for method, domains in by_method.items()
                   for domain, values in domains.items() if field in values)


def _defaults() -> dict[str, Any]:
    """The bench parser's defaults (parsing no arguments), to tell which options a run changed."""
    subparsers = argparse.ArgumentParser().add_subparsers()
    register(subparsers)
    return vars(subparsers.choices["bench"].parse_args([]))


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line)  # keeps the progress bar below the log lines
