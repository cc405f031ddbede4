"""The `shapeflow` command: check, graph, stages, replay.

Exit codes: 0 no errors (warnings allowed), 1 errors, 2 usage error. `check`, `graph` and
`stages` never import torch, transformers, accelerate or mlflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shapeflow.dsl.diagnostics import Diagnostic, render_github, render_human, render_json, summary

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line use: exit 2 with the message."""


def _spec_files(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """Files named directly plus every *.shape under named folders; folders become roots."""
    files, roots = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            roots.append(path)
            found = sorted(path.rglob("*.shape"))
            if not found:
                raise UsageError(f"no .shape files under {p}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
            if len(paths) > 1:  # several specs named together: each one's folder is allowed to all
                roots.append(path.parent)
        else:
            raise UsageError(f"no such file or folder: {p}")
    return files, roots


def _print_diagnostics(diags: list[Diagnostic], sources: dict[str, str], fmt: str, out=None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        print(render_json(diags), file=out)
    elif fmt == "github":
        if diags:
            print(render_github(diags), file=out)
    elif diags:
        print(render_human(diags, sources), file=out)
        print(summary(diags), file=out)


def _add_spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", action="append", default=[], metavar="DIR",
                   help="folder to search for `extends` targets (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="sets",
                   help="override a param (alpha=0.5), a config key (train.lr=1e-4) or a stage "
                   "argument (groups.n=16); repeatable")


def _compile_one(args, path: Path, roots: list[Path] = ()):
    from shapeflow.compiler.pipeline import compile_spec

    return compile_spec(path, search=[Path(p) for p in args.path], roots=list(roots), sets=args.sets)


# --- check ---------------------------------------------------------------------------------


def cmd_check(args) -> int:
    files, roots = _spec_files(args.paths)
    if args.emit and len(files) != 1:
        raise UsageError("--emit takes exactly one spec file")
    from shapeflow.compiler import check_cache
    from shapeflow.plugins import plugin_entry_points

    # Unchanged specs are not checked again (check_cache): the usual pre-commit / CI run loads
    # neither the stage library nor pydantic. --emit and --set always compile.
    plugins = bool(plugin_entry_points())
    cacheable = not args.emit and not args.sets and not plugins
    options = {"search": sorted(args.path), "roots": sorted(str(r) for r in roots)}
    cached = {f: check_cache.lookup(f, options) for f in files} if cacheable else {}
    all_diags: list[Diagnostic] = []
    if not all(cached.get(f) for f in files):
        from shapeflow.compiler.pipeline import plugin_diagnostics
        from shapeflow.stdlib.registry import default_registry

        all_diags.extend(plugin_diagnostics(default_registry()))
    sources: dict[str, str] = {}
    results = []
    for f in files:
        hit = cached.get(f)
        if hit is not None:
            diagnostics, texts = hit
        else:
            result = _compile_one(args, f, roots)
            results.append(result)
            diagnostics, texts = result.diagnostics, result.sources
            if cacheable:
                check_cache.store(f, options, diagnostics, texts, plugins)
        all_diags.extend(diagnostics)
        sources.update(texts)
    unique = {(d.span, d.code, d.message): d for d in all_diags}  # a parent's errors, reached twice
    diags = sorted(unique.values(), key=Diagnostic.sort_key)
    _print_diagnostics(diags, sources, args.format)
    has_errors = any(d.severity == "error" for d in diags)
    if args.emit and not has_errors:
        _emit(results[0], args.emit)
    return EXIT_ERRORS if has_errors else EXIT_OK


def _emit(result, what: str) -> None:
    from dataclasses import asdict

    from shapeflow.dsl import ast

    if what == "ast":
        from shapeflow.dsl.parser import parse_file

        from shapeflow.dsl.diagnostics import Diagnostics

        spec, _ = parse_file(result.path, str(result.path), Diagnostics())
        print(json.dumps(ast.to_data(spec), indent=2))
        return
    prog = result.program
    if what == "program":
        nodes = []
        for n in prog.nodes.values():
            d = asdict(n)
            d["type"], d["needs"] = str(n.type), sorted(n.needs)
            d["span"] = f"{n.span.file}:{n.span.line}:{n.span.column}"
            nodes.append(d)
        config = {k: v.model_dump() for k, v in prog.config.items()}
        print(json.dumps({"name": prog.name, "params": prog.params, "bindings": prog.bindings, "nodes": nodes,
                          "config": config, "needs": sorted(prog.needs), "engines": prog.engines}, indent=2,
                         default=str))
        return
    from shapeflow.compiler.pipeline import build_plan

    _, plan = build_plan(prog)
    print(json.dumps(plan.to_data(), indent=2))


# --- graph ---------------------------------------------------------------------------------


def cmd_graph(args) -> int:
    from shapeflow.compiler.pipeline import build_plan
    from shapeflow.compiler.render import FORMATS

    result = _compile_one(args, Path(args.spec))
    if not result.ok:
        _print_diagnostics(result.diagnostics, result.sources, "human", sys.stderr)
        return EXIT_ERRORS
    graph, plan = build_plan(result.program)
    out = Path(args.output) if args.output else None
    image = out is not None and out.suffix.lower() in (".svg", ".png", ".pdf")
    text = FORMATS["dot" if image else args.format](graph, plan)
    if out is None:
        sys.stdout.write(text)
        return EXIT_OK
    if image:
        import shutil
        import subprocess

        dot = shutil.which("dot")
        if dot is None:
            print(f"shapeflow graph: rendering {out.suffix} needs graphviz's `dot`, which is not installed.\n"
                  "  install it with `apt install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or "
                  "`conda install graphviz`,\n  or write DOT text instead: -o graph.dot", file=sys.stderr)
            return EXIT_ERRORS
        proc = subprocess.run([dot, f"-T{out.suffix[1:].lower()}", "-o", str(out)], input=text, text=True,
                              capture_output=True)
        if proc.returncode != 0:
            print(f"shapeflow graph: dot failed: {proc.stderr.strip()}", file=sys.stderr)
            return EXIT_ERRORS
    else:
        out.write_text(text, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return EXIT_OK


# --- stages --------------------------------------------------------------------------------


def cmd_stages(args) -> int:
    import difflib

    from shapeflow.stdlib.registry import default_registry, doc_page

    reg = default_registry()
    for message in reg.plugin_errors:
        print(f"warning: {message}", file=sys.stderr)
    if args.name:
        if args.name not in reg:
            close = difflib.get_close_matches(args.name, reg.names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            print(f"shapeflow stages: unknown stage '{args.name}'{hint}", file=sys.stderr)
            return EXIT_ERRORS
        st = reg[args.name]
        if args.json:
            print(json.dumps(st.describe(), indent=2))
        else:
            sys.stdout.write(doc_page(st))
        return EXIT_OK
    stages = [reg[n] for n in reg.names()]
    if args.json:
        print(json.dumps([s.describe() for s in stages], indent=2))
        return EXIT_OK
    width = max(len(s.name) for s in stages)
    for kind in ("model", "data", "rollout", "verify", "reward", "signal", "advantage", "loss"):
        group = [s for s in stages if s.kind == kind]
        if not group:
            continue
        print(f"{kind}:")
        for s in group:
            print(f"  {s.name:<{width}}  {s.output!s:<15} {s.summary}")
    return EXIT_OK


# --- replay --------------------------------------------------------------------------------


def cmd_replay(args) -> int:
    result = _compile_one(args, Path(args.spec))
    if not result.ok:
        _print_diagnostics(result.diagnostics, result.sources, "human", sys.stderr)
        return EXIT_ERRORS
    from shapeflow.runtime.replay import ReplayError, replay

    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        replay(result.program, Path(args.rollouts), out, advantage=args.advantage, objective=args.objective,
               report=sys.stderr, state=Path(args.state) if args.state else None)
    except ReplayError as exc:
        print(f"shapeflow replay: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    finally:
        if out is not sys.stdout:
            out.close()
    return EXIT_OK


# --- run and eval ---------------------------------------------------------------------------


def cmd_run(args) -> int:
    result = _compile_one(args, Path(args.spec))
    if not result.ok:
        _print_diagnostics(result.diagnostics, result.sources, "human", sys.stderr)
        return EXIT_ERRORS
    from shapeflow.runtime.executor import StageError
    from shapeflow.runtime.models import ModelError
    from shapeflow.runtime.run import RunOptions, run
    from shapeflow.runtime.trainer import RunError

    options = RunOptions(
        steps=args.steps, out=Path(args.out) if args.out else None, seed=args.seed, device=args.device,
        tracking=args.tracking, tracking_uri=args.tracking_uri, resume=args.resume,
        record=Path(args.record) if args.record else None, eval_size=args.eval_size,
    )
    try:
        summary = run(result.program, Path(args.spec).read_text(encoding="utf-8"), options)
    except (RunError, ModelError, StageError) as exc:
        print(f"shapeflow run: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    if summary.get("rank", 0) == 0:  # under `accelerate launch`, the first process reports
        _print_run_summary(summary)
    return EXIT_OK


def _print_run_summary(summary: dict) -> None:
    before = summary.get("eval_before", {}).get("eval/accuracy")
    after = summary.get("eval_after", {}).get("eval/accuracy")
    run_dir = Path(summary["run_dir"])
    print(f"run: {run_dir}  ({summary['status'].lower()}, {summary['last_step']} steps)")
    if after is not None:
        first = f"{before:.3f} -> " if before is not None else ""
        print(f"held-out greedy accuracy: {first}{after:.3f}")
        passk = {k: v for k, v in summary["eval_after"].items() if k.startswith("eval/pass@")}
        for k, v in passk.items():
            print(f"held-out {k.removeprefix('eval/')}: {v:.3f}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}")
    if summary.get("plots"):
        print(f"plots:   {run_dir / 'plots'}/ ({', '.join(Path(p).name for p in summary['plots'])})")
    if summary.get("tracking"):
        print(summary["tracking"])


def cmd_eval(args) -> int:
    result = _compile_one(args, Path(args.spec))
    if not result.ok:
        _print_diagnostics(result.diagnostics, result.sources, "human", sys.stderr)
        return EXIT_ERRORS
    from shapeflow.compiler.pipeline import build_plan
    from shapeflow.runtime.models import ModelError
    from shapeflow.runtime.run import find_checkpoint, load_checkpoint
    from shapeflow.runtime.trainer import RunError, Trainer
    from shapeflow.stdlib.registry import default_registry

    program = result.program
    _, plan = build_plan(program)
    config = program.config["train"]
    try:
        ckpt = find_checkpoint(Path(args.checkpoint))
        trainer = Trainer(program, plan, default_registry(), config, device=args.device)
        trainer.setup()
        trainer.load_state_dict(load_checkpoint(ckpt))
        metrics = trainer.evaluate(size=args.size or config.eval_size, k=args.k)
    except (RunError, ModelError) as exc:
        print(f"shapeflow eval: {exc}", file=sys.stderr)
        return EXIT_ERRORS
    print(json.dumps({"checkpoint": str(ckpt), **metrics}, indent=2))
    return EXIT_OK


# --- main ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shapeflow", description="Advantage- and reward-shaping methods as spec files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="check specs; silent when clean")
    p.add_argument("paths", nargs="+", metavar="PATH", help=".shape files or folders (searched recursively)")
    p.add_argument("--format", choices=("human", "json", "github"), default="human")
    p.add_argument("--emit", choices=("ast", "program", "plan"), help="print an intermediate result (one spec)")
    _add_spec_options(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("graph", help="the spec's stage graph as dot, mermaid or json")
    p.add_argument("spec")
    p.add_argument("--format", choices=("dot", "mermaid", "json"), default="dot")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE; .svg/.png/.pdf render through graphviz")
    _add_spec_options(p)
    p.set_defaults(fn=cmd_graph)

    p = sub.add_parser("stages", help="list registered stages, or show one stage's doc page")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_stages)

    p = sub.add_parser("run", help="train a policy from a spec")
    p.add_argument("spec")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/NAME-TIME)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tracking", choices=("mlflow", "jsonl", "none"), help="override track.backend")
    p.add_argument("--tracking-uri", metavar="URI", help="log to this MLflow tracking server")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--record", metavar="FILE", help="write every rollout, in the replay format, to FILE")
    p.add_argument("--eval-size", type=int, metavar="N", help="held-out problems per evaluation")
    _add_spec_options(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("eval", help="held-out greedy accuracy and pass@k of a checkpoint")
    p.add_argument("spec")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder, or a run folder")
    p.add_argument("--k", type=int, default=1, help="also report pass@k with k samples per problem")
    p.add_argument("--size", type=int, help="held-out problems (default train.eval_size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_spec_options(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("replay", help="evaluate verify → reward → advantage on recorded rollouts")
    p.add_argument("spec")
    p.add_argument("--rollouts", required=True, metavar="FILE", help="recorded rollouts (JSON Lines)")
    p.add_argument("--out", metavar="FILE", help="write results here instead of standard output")
    p.add_argument("--advantage", metavar="BINDING", help="which advantage binding to report (default: the one "
                   "the objective uses)")
    p.add_argument("--objective", action="store_true", help="also evaluate the objective on the recorded "
                   "extra.policy_logprobs: per-token loss terms and the gradient for each line, the loss on stderr")
    p.add_argument("--state", metavar="DIR", help="start the stateful stages (trackers, EMAs, adaptive "
                   "coefficients) from a checkpoint's saved state (a checkpoint folder or a run folder)")
    _add_spec_options(p)
    p.set_defaults(fn=cmd_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, a usage error exits 2
        return int(exc.code or 0)
    try:
        return args.fn(args)
    except UsageError as exc:
        print(f"shapeflow {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `shapeflow stages | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
