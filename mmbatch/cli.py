"""`mmbatch` command line: a thin layer over the stage modules.

Exit codes (documented in README):
  0  success, nothing quarantined
  1  the command failed
  2  bad usage or an invalid workflow/config
  3  the command finished, but some input rows were quarantined (see quarantine/), or audit flagged rows
  130 interrupted (Ctrl-C or SIGTERM); committed units are kept, rerun the same command to resume
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

from mmbatch.errors import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_QUARANTINED, EXIT_USAGE


def _fmt(text: str) -> str:
    return textwrap.dedent(text).strip()


def _add_workflow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("workflow", help="workflow YAML file (see README 'Workflow file')")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a workflow field, e.g. --set train.epochs=3 --set train.modalities=[audio]")


def _add_allow_incomplete(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-incomplete", action="store_true",
                   help="read a fused folder that has no manifest or mixes settings (refused by default: exit 2)")


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, an example, its arguments and what it runs (returns the exit code)."""
    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmbatch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fmt("""
            Batch multimodal feature extraction and fusion training on Ray.
            Stages: ingest -> preprocess -> train -> evaluate (retrain runs them as one cycle).
        """),
        epilog="Run `mmbatch demo` for an end-to-end run on an embedded local Ray.",
    )
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log more: Ray's INFO logs, its workers' chatter and Ray Data's own progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help, description=c.help, epilog="example:\n  " + c.example,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from mmbatch.engine import progress, runtime
    from mmbatch.config import WorkflowError
    from mmbatch.errors import LockLost, UsageError
    runtime.VERBOSE = args.verbose
    if argv is None:            # the real command line: SIGTERM stops it like Ctrl-C
        runtime.handle_sigterm_as_interrupt()
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except (WorkflowError, UsageError) as e:
        print(f"mmbatch {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LockLost as e:
        print(f"mmbatch {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return _interrupted(args, progress.committed_units())


def _interrupted(args, committed: int) -> int:
    """Ctrl-C / SIGTERM: one line, Ray stopped within seconds, exit 130."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)        # a second Ctrl-C must not cut the clean-up short
    _stdout_to_devnull()                                 # `| tee log`: Ctrl-C killed tee too
    units = f"{committed} unit{'s' if committed != 1 else ''} committed"
    tell_user(f"\nmmbatch {args.command}: interrupted; {units}, rerun the same command to resume\n")
    import ray

    from mmbatch.engine.runtime import shutdown_ray
    if ray.is_initialized():
        shutdown_ray()
    return EXIT_INTERRUPTED


def tell_user(text: str) -> None:
    """Write ``text`` where the user sees it after Ctrl-C. stderr first; when stderr is a pipe whose reader
    the same Ctrl-C killed (``2>&1 | tee log``: EPIPE), or a file, the terminal (/dev/tty) gets it too.
    A stderr that refused it goes to /dev/null from then on (Ray's shutdown still logs there)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        delivered = True
    except (OSError, ValueError):                        # EPIPE: the reader is gone
        delivered = False
        _to_devnull(_fd_of(sys.stderr))
    fd = _fd_of(sys.stderr)
    if fd is None or _is_terminal(fd) or (delivered and _is_pipe(fd)):
        return                                           # the terminal, or a living reader (tee), shows it
    try:
        tty = os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY)
    except OSError:                                      # no controlling terminal (a service, a test)
        return
    try:
        os.write(tty, text.encode())
    except OSError:
        pass
    finally:
        os.close(tty)


def _fd_of(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):        # a test's capture: no descriptor
        return None


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _is_pipe(fd: int) -> bool:
    import stat
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def _stdout_to_devnull() -> None:
    """From now on stdout goes nowhere: when it is a pipe whose reader is gone, a write (Ray's log
    forwarding, the final flush at exit) would fail with BrokenPipeError instead of letting the clean-up
    finish. The interrupted line goes to stderr."""
    try:
        sys.stdout.flush()
    except OSError:
        pass
    _to_devnull(_fd_of(sys.stdout))


def _to_devnull(fd: int | None) -> None:
    if fd is None:                                       # no real stream (a test's capture): nothing to protect
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except OSError:
        pass


def _load(args):
    from mmbatch.config import load_workflow
    return load_workflow(args.workflow, args.overrides)


def print_next_steps(written: str, out: str | None, quarantined: int, next_steps: list[str]) -> None:
    """The last lines of a command: what it wrote, where quarantined rows went, what to run or open next."""
    print(f"\n{written}")
    if out and quarantined:
        files = quarantine_files(out)
        print(f"{quarantined} row(s) quarantined, with the reason for each, in {storage_join(out, 'quarantine')}/"
              + (f": {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}" if files else ""))
    print("next: " + "\n      ".join(next_steps))


def quarantine_files(out: str) -> list[str]:
    """Names of the non-empty quarantine Parquet files under ``out/quarantine``."""
    import pyarrow.parquet as pq

    from mmbatch.engine import storage
    try:
        fs, root = storage.url_to_fs(out)
        qdir = storage.join(root, storage.QUARANTINE_DIR)
        paths = sorted(p for p in fs.ls(qdir, detail=False) if p.endswith(".parquet"))
        out_files = []
        for p in paths:
            with fs.open(p, "rb") as f:
                if pq.ParquetFile(f).metadata.num_rows:
                    out_files.append(p.rstrip("/").rsplit("/", 1)[-1])
        return out_files
    except (OSError, ValueError):
        return []


def storage_join(*parts: str) -> str:
    from mmbatch.engine import storage
    return storage.join(*parts)


def _with_overrides(command: str, args) -> str:
    """``command`` plus the ``--set`` overrides this run was given, so that the next step sees the same workflow."""
    return " ".join([command, *(f"--set {shlex.quote(o)}" for o in args.overrides)])


# --- the commands: arguments, then what each runs ----------------------------------------------------
def _demo_args(sp) -> None:
    sp.add_argument("--out", default="mmbatch-demo", help="output folder (default ./mmbatch-demo)")
    sp.add_argument("--per-class", type=int, default=48, help="samples per class per corpus (default 48)")
    sp.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    sp.add_argument("--num-cpus", type=int, default=None, help="CPUs for the embedded Ray (default: all)")


def _demo(args) -> int:
    from mmbatch.demo.run import run_demo
    return run_demo(args.out, per_class=args.per_class, epochs=args.epochs, num_cpus=args.num_cpus)


def _ingest_args(sp) -> None:
    sp.add_argument("kind", choices=["imagenet", "librispeech", "timit", "hf", "manifest"])
    sp.add_argument("input", help="corpus root: local path or fsspec URI (s3://..., gs://...)")
    sp.add_argument("--out", required=True, help="output folder for Parquet shards")
    sp.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB of raw media (default 256)")
    sp.add_argument("--shard-rows", type=int, default=None, help="cap rows per shard")
    sp.add_argument("--include-sa", action="store_true", help="timit: include SA1/SA2 dialect sentences")
    sp.add_argument("--phones", type=int, choices=[61, 48, 39], default=61, help="timit: phone set (default 61)")
    sp.add_argument("--columns", default=None,
                    help="hf/manifest: column mapping, e.g. 'img=image,transcript=text,class=label'")
    sp.add_argument("--split", default=None, help="hf/manifest: split to assign when the data has none")
    sp.add_argument("--allow-outside", action="store_true",
                    help="manifest: allow paths outside the manifest's folder (refused by default)")
    sp.add_argument("--max-file-mb", type=float, default=512.0,
                    help="quarantine (too_large), unread, a sample whose files exceed this many MiB (default 512)")
    sp.add_argument("--address", default=None, help="Ray address (default: embedded local Ray or RAY_ADDRESS)")
    sp.add_argument("--max-workers", type=int, default=None,
                    help="most shard readers (default: one per CPU the cluster has or its autoscaler can add)")


def _ingest(args) -> int:
    from mmbatch.ingest.run import IngestOptions, run_ingest
    opts = IngestOptions(shard_mb=args.shard_mb, shard_rows=args.shard_rows, include_sa=args.include_sa,
                         phones=args.phones, columns=args.columns, split=args.split,
                         allow_outside=args.allow_outside, max_file_mb=args.max_file_mb)
    summary = run_ingest(args.kind, args.input, args.out, opts, address=args.address, max_workers=args.max_workers)
    print_next_steps(f"wrote {summary.ingested} canonical rows to {summary.out} (_manifest.json lists the "
                     f"shards)", summary.out, summary.quarantined,
                     [f"mmbatch inspect {summary.out}",
                      "list it under `datasets:` in a workflow, then: mmbatch preprocess WORKFLOW.yaml"])
    return EXIT_QUARANTINED if summary.quarantined else EXIT_OK


def _retrain_args(sp) -> None:
    _add_workflow_args(sp)
    _add_allow_incomplete(sp)


def _preprocess(args) -> int:
    from mmbatch.preprocess import run_preprocess
    summary = run_preprocess(_load(args))
    print_next_steps(f"wrote {summary.rows_out} fused feature rows to {summary.out}", summary.out,
                     summary.quarantined,
                     [f"mmbatch inspect {summary.out}", _with_overrides(f"mmbatch train {args.workflow} --baselines",
                                                                        args)])
    return EXIT_QUARANTINED if summary.quarantined else EXIT_OK


def _train_args(sp) -> None:
    _add_workflow_args(sp)
    sp.add_argument("--baselines", action="store_true", help="also train each modality alone and compare")
    _add_allow_incomplete(sp)


def _train(args) -> int:
    from mmbatch.train.run import run_training
    wf = _load(args)
    result = run_training(wf, baselines=args.baselines or None, allow_incomplete=args.allow_incomplete)
    print_next_steps(f"wrote the model to {result.model_dir} (model.pt + model.json)", None, 0,
                     [f"open {result.report_path}" if result.report_path else f"see {result.run_dir}",
                      f"mmbatch evaluate {shlex.quote(str(result.model_dir))} --data {shlex.quote(wf.train_data())}"])
    return EXIT_OK


def _evaluate_args(sp) -> None:
    sp.add_argument("checkpoint", help="exported model folder (model.pt + model.json) or a Ray Train checkpoint")
    sp.add_argument("--data", required=True, help="fused feature Parquet folder")
    sp.add_argument("--split", default="test", help="split to score (default test; 'all' for every row)")
    sp.add_argument("--out", default=None, help="report folder (default: eval beside the model folder)")
    _add_allow_incomplete(sp)


def _evaluate(args) -> int:
    from mmbatch.train.evaluate import evaluate_cli
    evaluate_cli(args.checkpoint, args.data, split=args.split, out=args.out, allow_incomplete=args.allow_incomplete)
    return EXIT_OK


def _retrain(args) -> int:
    from mmbatch.ops.retrain import run_retrain
    run_retrain(_load(args), allow_incomplete=args.allow_incomplete)
    return EXIT_OK


def _registry_args(sp) -> None:
    sp.add_argument("action", choices=["list", "show", "promote", "rollback"])
    sp.add_argument("registry", help="registry folder or URI")
    sp.add_argument("version", nargs="?", help="version for show/promote")


def _registry(args) -> int:
    from mmbatch.ops.registry import registry_cli
    return registry_cli(args.action, args.registry, args.version)


def _submit_args(sp) -> None:
    sp.add_argument("--address", default=None, help="Ray dashboard address (default RAY_ADDRESS or http://127.0.0.1:8265)")
    sp.add_argument("--wait", action="store_true", help="stream the logs and exit with the job's status")
    sp.add_argument("--working-dir", default=None, help="upload this folder as the job's working dir")
    sp.add_argument("--pip", action="append", default=[], help="pip requirement for the job's runtime_env (repeatable)")
    sp.add_argument("--job-id", default=None, help="submission id (default: generated)")
    sp.add_argument("--insecure", action="store_true", help="send the cluster token over plain http:// to a "
                    "non-loopback address (refused otherwise: use https:// or a tunnel to 127.0.0.1)")
    sp.add_argument("args", nargs=argparse.REMAINDER, help="-- then the mmbatch subcommand and its arguments")


def _submit(args) -> int:
    from mmbatch.errors import UsageError
    from mmbatch.ops.submit import submit_cli
    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        raise UsageError("nothing to submit: give the mmbatch command after --, "
                         "e.g. mmbatch submit --wait -- preprocess wf.yaml")
    return submit_cli(rest, address=args.address, wait=args.wait, working_dir=args.working_dir,
                      pip=args.pip, job_id=args.job_id, insecure=args.insecure)


def _inspect_args(sp) -> None:
    sp.add_argument("path")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    _add_allow_incomplete(sp)


def _inspect(args) -> int:
    from mmbatch.ops.describe import describe, render_text
    info = describe(args.path, allow_incomplete=args.allow_incomplete)
    print(json.dumps(info, indent=2, default=str) if args.json else render_text(info))
    return EXIT_OK


def _convert_args(sp) -> None:
    sp.add_argument("direction", choices=["image-to-speech", "image-to-text", "text-to-image", "text-to-speech"])
    sp.add_argument("input", help="a file or a folder of files")
    sp.add_argument("--out", required=True, help="output file (single input) or folder")
    sp.add_argument("--style", choices=["plain", "wordcloud"], default="plain", help="text-to-image rendering")


def _convert(args) -> int:
    from mmbatch.convert.cli import convert_cli
    return convert_cli(args.direction, args.input, args.out, style=args.style)


def _duplicates_args(sp) -> None:
    sp.add_argument("datasets", nargs="+", metavar="CANONICAL", help="canonical folders written by `mmbatch ingest`")
    sp.add_argument("--out", required=True,
                    help="folder for pairs.parquet, groups.parquet, summary.json and report.html")
    sp.add_argument("--address", default=None, help="Ray address (default: embedded local Ray or RAY_ADDRESS)")
    sp.add_argument("--threshold", action="append", default=[], metavar="MODALITY=SCORE",
                    help="near-duplicate score threshold of one modality (image, audio, text), e.g. image=0.9; "
                    "repeatable (defaults: docs/duplicates.md)")


def _duplicates(args) -> int:
    from mmbatch.dedup.run import render_summary, run_duplicates
    from mmbatch.errors import UsageError
    thresholds = {}
    for t in args.threshold:
        m, eq, v = t.partition("=")
        try:
            thresholds[m.strip()] = float(v) if eq else None
        except ValueError:
            thresholds[m.strip()] = v
        if not eq:
            raise UsageError(f"--threshold {t!r}: MODALITY=SCORE, e.g. image=0.9")
    res = run_duplicates(args.datasets, args.out, address=args.address, thresholds=thresholds)
    print(render_summary(res.summary))
    print_next_steps(f"wrote {res.pairs.num_rows} pairs to {storage_join(args.out, 'pairs.parquet')} "
                     f"and the groups to {storage_join(args.out, 'groups.parquet')}", None, 0,
                     [f"open {storage_join(args.out, 'report.html')}",
                      "set `dedup: {leakage: report}` in a preprocess workflow to count leaked rows there"])
    return EXIT_OK


def _audit_args(sp) -> None:
    _add_workflow_args(sp)
    sp.add_argument("--out", required=True, help="folder for issues.parquet, summary.json and report.html")
    _add_allow_incomplete(sp)


def _audit(args) -> int:
    from mmbatch.audit.run import render_summary, run_audit
    res = run_audit(_load(args), args.out, allow_incomplete=args.allow_incomplete)
    print(render_summary(res.summary))
    issues = storage_join(args.out, "issues.parquet")
    print_next_steps(f"wrote {res.flagged} flagged row(s) to {issues}", None, 0,
                     [f"open {storage_join(args.out, 'report.html')}",
                      _with_overrides(f"mmbatch train {args.workflow} --set train.exclude={shlex.quote(issues)}",
                                      args)])
    return EXIT_QUARANTINED if res.flagged else EXIT_OK


COMMANDS: dict[str, Command] = {
    "demo": Command("generate a small multimodal corpus and run every stage end to end",
                    "mmbatch demo --out /tmp/mmdemo", _demo_args, _demo),
    "ingest": Command("read a corpus into canonical Arrow rows (sharded Parquet)",
                      "mmbatch ingest librispeech /data/LibriSpeech --out /data/canonical/librispeech",
                      _ingest_args, _ingest),
    "preprocess": Command("extract per-modality features and write fused per-sample Parquet",
                          "mmbatch preprocess workflows/imagenet_features.yaml --set output.path=/data/features",
                          _add_workflow_args, _preprocess),
    "train": Command("train a fusion model with Ray Train on fused Parquet",
                     "mmbatch train workflows/train_fusion.yaml --baselines", _train_args, _train),
    "evaluate": Command("score a checkpoint on fused Parquet and write the report",
                        "mmbatch evaluate out/train/fusion/model --data out/features --out out/eval",
                        _evaluate_args, _evaluate),
    "retrain": Command("one idempotent retraining cycle: preprocess new data, train, compare, promote",
                       "mmbatch retrain workflows/retrain.yaml",
                       _retrain_args, _retrain),
    "registry": Command("list, show, promote or roll back model versions", "mmbatch registry list out/registry",
                        _registry_args, _registry),
    "submit": Command("submit an mmbatch command to a Ray cluster through the Jobs API",
                      "mmbatch submit --address http://127.0.0.1:8265 --wait -- preprocess "
                      "workflows/librispeech_features.yaml", _submit_args, _submit),
    "inspect": Command("describe any Parquet folder mmbatch wrote", "mmbatch inspect out/features --json",
                       _inspect_args, _inspect),
    "convert": Command("convert between modalities (image/text to speech, OCR, text rendering)",
                       "mmbatch convert image-to-speech photo.jpg --out photo.wav", _convert_args, _convert),
    "duplicates": Command("exact and near duplicates within and across canonical datasets, per modality",
                          "mmbatch duplicates /data/canonical/librispeech /data/canonical/timit --out out/dups",
                          _duplicates_args, _duplicates),
    "audit": Command("label errors and mismatched pairs, from cross-validated models on the fused features",
                     "mmbatch audit workflows/train_fusion.yaml --out out/audit", _audit_args, _audit),
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
