"""The ``lakehouse`` command: generate sample data, run a batch or one step, query the tables."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.errors import LakehouseError, describe

if TYPE_CHECKING:
    from rich.status import Status

    from pipeline.report import BatchReport, StepReport

app = typer.Typer(
    help="E-commerce lakehouse: raw CSVs -> validated, deduplicated, partitioned Delta tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)
out = Console()
_state = {"debug": False}

ROOT_HELP = (
    "Lakehouse root: a local folder or s3://bucket[/prefix] (endpoint and credentials from AWS_* variables)."
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
) -> None:
    _state["debug"] = debug


def _progress(status: Status) -> Callable[[str], None]:
    def report(message: str) -> None:
        status.update(f"[bold]{message}")

    return report


@app.command()
def generate(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    scale: float = typer.Option(
        0.01, "--scale", help="1.0 is the Instacart size (3.4 M orders, 33.8 M items)."
    ),
    seed: int = typer.Option(42, "--seed", help="Random seed: the same seed writes the same files."),
    next_day: bool = typer.Option(
        False, "--next-day", help="Write the next day's batch for the loaded lake."
    ),
    clean: bool = typer.Option(False, "--clean", help="Write no dirty rows."),
    product_limit: Optional[int] = typer.Option(
        None, "--product-limit", help="With --next-day: order items use product ids up to this only."
    ),
) -> None:
    """Write Instacart-like CSVs (about 1% dirty rows) into ROOT/raw/<table>/."""
    from pipeline.generate import generate as generate_full
    from pipeline.generate import generate_next_day
    from pipeline.storage import open_store

    store = open_store(root)
    with console.status("generating") as status:
        if next_day:
            result = generate_next_day(
                store,
                scale=scale,
                seed=seed,
                dirty=not clean,
                progress=_progress(status),
                product_limit=product_limit,
            )
        else:
            result = generate_full(store, scale=scale, seed=seed, dirty=not clean, progress=_progress(status))
    for table, rows in result.rows.items():
        out.print(f"{table}: {rows:,} rows")
    out.print(f"{len(result.files)} files written under {store.uri('raw/')}")


MEMORY_BUDGET_DEFAULT = "2.75GiB"
MEMORY_BUDGET_HELP = (
    "Memory a table's step may hold (e.g. 3GiB, 512MiB): a table whose files need more is resolved in "
    "buckets of keys and merged in groups of partitions."
)


def parse_size(value: str) -> int:
    from pipeline.stages import parse_size as parse  # polars is imported only by commands that need it

    return parse(value)


def _memory_budget(value: str) -> str:
    try:
        parse_size(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    return value


@app.command()
def run(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    force: bool = typer.Option(
        False, "--force", help="Load files even if a succeeded batch loaded the same content already."
    ),
    memory_budget: str = typer.Option(
        MEMORY_BUDGET_DEFAULT, "--memory-budget", help=MEMORY_BUDGET_HELP, callback=_memory_budget
    ),
) -> None:
    """Process one batch: every CSV now in ROOT/raw/ (or resume the unfinished batch)."""
    from pipeline.batch import run_batch
    from pipeline.storage import open_store

    store = open_store(root)
    with console.status("starting") as status:
        report = run_batch(
            store, progress=_progress(status), force=force, memory_budget=parse_size(memory_budget)
        )
    _print_summary(report)


@app.command()
def step(
    table: str = typer.Argument(..., help="products, orders or order_items."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    manifest: str = typer.Option(
        ..., "--manifest", help="The batch manifest: a key under ROOT, its full URI, or a batch id."
    ),
    memory_budget: str = typer.Option(
        MEMORY_BUDGET_DEFAULT, "--memory-budget", help=MEMORY_BUDGET_HELP, callback=_memory_budget
    ),
) -> None:
    """Run one table's step of a batch (what a Fargate task or Glue job runs)."""
    from pipeline.batch import load_step_report, run_step, save_step_report
    from pipeline.errors import StepError
    from pipeline.manifest import read_manifest
    from pipeline.specs import get_spec
    from pipeline.storage import open_store

    store = open_store(root)
    spec = get_spec(table)
    batch = read_manifest(store, manifest)
    done = load_step_report(store, batch.batch_id, spec.name)
    if done is not None:
        # A resumed batch runs every step again: a step that committed is not redone (its files may be
        # archived by now).
        out.print(f"step {table} of batch {batch.batch_id} is done already", highlight=False)
        _print_steps([done])
        return
    with console.status(f"{table}") as status:
        try:
            report = run_step(
                store, batch, spec, progress=_progress(status), memory_budget=parse_size(memory_budget)
            )
        except LakehouseError as error:
            raise StepError(table, error) from error
    save_step_report(store, batch.batch_id, report)
    _print_steps([report])


@app.command()
def query(
    sql: str = typer.Argument(
        ..., help="Polars SQL over products, orders, order_items and rejected_<table>."
    ),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    limit: int = typer.Option(50, "--limit", help="Rows to print at most."),
) -> None:
    """Run SQL over the lakehouse tables (the local stand-in for Athena)."""
    import polars as pl

    from pipeline.query import run_query
    from pipeline.storage import open_store

    result = run_query(open_store(root), sql)
    with pl.Config(tbl_rows=limit, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200):
        out.print(str(result.head(limit)), highlight=False)
    if result.height > limit:
        out.print(f"({result.height:,} rows, {limit} shown)")


@app.command()
def maintain(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    retention_hours: int = typer.Option(
        168,
        "--retention-hours",
        help="Vacuum files unreferenced for this long (at least the table's retention).",
    ),
) -> None:
    """Compact small files, vacuum old ones and checkpoint every lakehouse and rejected table."""
    from pipeline.batch import maintain_tables
    from pipeline.storage import open_store

    with console.status("maintaining") as status:
        results = maintain_tables(
            open_store(root), retention_hours=retention_hours, progress=_progress(status)
        )
    table = Table(title="maintenance")
    for header in ("table", "files compacted", "files written", "files vacuumed", "version"):
        table.add_column(header, justify="left" if header == "table" else "right")
    for name, result in results.items():
        table.add_row(
            name,
            str(result.files_removed),
            str(result.files_added),
            str(result.vacuumed),
            str(result.version),
        )
    out.print(table)


@app.command()
def bench(
    scale: float = typer.Option(0.1, "--scale", help="Scale of the full load (1.0 is the Instacart size)."),
    root: Optional[str] = typer.Option(
        None, "--root", help="Local folder for the benchmark's lakes (default: a temp dir)."
    ),
    json_file: Optional[str] = typer.Option(
        None, "--json", help="Also write the figures as JSON to this file."
    ),
    small_scale: float = typer.Option(0.1, "--small-scale", help="The smaller lake of the growth figure."),
    seed: int = typer.Option(42, "--seed", help="Random seed of the generated data."),
    shapes: Optional[str] = typer.Option(
        None,
        "--shapes",
        help="Input shapes to load besides the generated one, comma-separated, or 'none' (default: all).",
    ),
    triple: bool = typer.Option(
        False, "--triple", help="Also load the batch three times over (3x the scale): time and memory growth."
    ),
) -> None:
    """Benchmark: floor, full load and input shapes, daily batch, replay, growth, maintenance."""
    from pipeline.bench import SHAPES, print_figures, run_bench

    chosen = None if shapes is None else [name.strip() for name in shapes.split(",") if name.strip()]
    if chosen == ["none"]:
        chosen = []
    unknown = [name for name in chosen or [] if name not in SHAPES]
    if unknown:
        raise typer.BadParameter(
            f"unknown input shape {unknown[0]!r}; the shapes are: {', '.join(SHAPES)}", param_hint="--shapes"
        )
    with console.status("benchmark") as status:
        figures = run_bench(
            scale=scale,
            small_scale=small_scale,
            root=root,
            seed=seed,
            shapes=chosen,
            triple=triple,
            progress=_progress(status),
        )
    print_figures(figures, out)
    if json_file:
        import json
        from pathlib import Path

        Path(json_file).write_text(json.dumps(figures, indent=2))
        out.print(f"figures written to {json_file}")


@app.command()
def unlock(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    force: bool = typer.Option(False, "--force", help="Remove the lock even if its holder may still run."),
) -> None:
    """Remove the batch lock left by a run that died (a live holder's only with --force)."""
    from pipeline.lock import unlock as remove_lock
    from pipeline.storage import open_store

    store = open_store(root)
    holder = remove_lock(store, force=force)
    if holder is None:
        out.print(f"{store.root} is not locked", highlight=False)
        return
    out.print(f"removed the lock of {store.root} (batch {holder.get('batch', '?')})", highlight=False)


@app.command()
def abandon(
    batch_id: str = typer.Argument(..., help="The unfinished batch to give up (its id or manifest)."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
) -> None:
    """Give up an unfinished batch: remove its manifest, rejected rows and step reports."""
    from pipeline.batch import abandon_batch
    from pipeline.storage import open_store

    done = abandon_batch(open_store(root), batch_id)
    rejected = ", ".join(f"{table} {count:,}" for table, count in done.rejected_rows.items())
    out.print(
        f"abandoned batch {done.batch_id}: removed its manifest, {done.step_reports} step report(s), "
        f"{done.history_notes} load note(s) and its rejected rows ({rejected}); "
        f"{done.raw_files} of its files are in raw/ for the next batch"
        + (
            f" ({len(done.restored)} brought back from archived/: {', '.join(done.restored)})"
            if done.restored
            else ""
        )
        + ", and rows its finished steps merged stay in the tables (the next batch finds them unchanged)",
        highlight=False,
        soft_wrap=True,
    )


def _print_steps(steps: list[StepReport]) -> None:
    table = Table(title="rows per table")
    for header in (
        "table",
        "files",
        "rows in",
        "inserted",
        "updated",
        "unchanged",
        "rejected",
        "delta version",
        "seconds",
    ):
        table.add_column(header, justify="left" if header == "table" else "right")
    for s in steps:
        table.add_row(
            s.table,
            str(s.files),
            f"{s.rows_in:,}",
            f"{s.inserted:,}",
            f"{s.updated:,}",
            f"{s.unchanged:,}",
            f"{s.rejected:,}",
            "-" if s.delta_version is None else str(s.delta_version),
            f"{s.seconds:.2f}",
        )
    out.print(table)
    reasons = Table(title="rejected rows by reason")
    for header in ("table", "reason", "rows"):
        reasons.add_column(header, justify="right" if header == "rows" else "left")
    for s in steps:
        for reason, count in s.rejected_by_reason.items():
            reasons.add_row(s.table, reason, f"{count:,}")
        for note in s.notes:
            out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
        for file in s.empty_files:
            out.print(f"note: {file} is empty", highlight=False, markup=False)
        for file, count in s.empty_lines.items():
            out.print(f"note: {file}: {count:,} empty line(s), not rows", highlight=False, markup=False)
        for file, batch in s.skipped_files.items():
            out.print(
                f"note: {file} skipped: batch {batch} loaded this content already (--force loads it again)",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    if reasons.row_count:
        out.print(reasons)


def _print_summary(report: BatchReport) -> None:
    _print_steps(report.steps)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    out.print(
        f"batch {report.batch_id} {report.status} in {report.seconds:.1f} s; "
        f"{report.archived_files} files archived; rows now: "
        + ", ".join(f"{t} {n:,}" for t, n in report.table_counts.items())
    )


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C (locks released, downloads removed), then exits 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _native_output_aside() -> Callable[[bool], None]:
    """Send what native libraries write to file descriptor 2 to a log file; Python's output stays.

    delta-rs's worker threads panic by the dozen when a disk fills up (object_store's "Already shut
    down"), each with a trace, after the error that matters was raised. Returns the function to call
    at exit: it says where the log is if the command failed and the log holds anything.
    """
    import os
    import tempfile

    try:
        if sys.stderr.fileno() != 2:
            return lambda failed: None
        kept = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no real stderr (captured, closed): leave it be
        return lambda failed: None
    _remove_stale_native_logs()
    original = sys.stderr
    sys.stderr.flush()
    sys.stderr = os.fdopen(
        os.dup(kept), "w", buffering=1, encoding=original.encoding, errors="backslashreplace"
    )
    fd, log = tempfile.mkstemp(prefix=f"{NATIVE_LOG_PREFIX}{os.getpid()}-", suffix=".log")
    os.dup2(fd, 2)
    os.close(fd)

    def finish(failed: bool) -> None:
        # File descriptor 2 stays on the log: delta-rs's threads may still panic while the process ends.
        sys.stderr.flush()
        os.close(kept)
        size = os.path.getsize(log) if os.path.exists(log) else 0
        if failed and size:
            console.print(f"(native library output of this run: {log})", highlight=False, markup=False)
        else:
            with contextlib.suppress(OSError):
                os.unlink(log)

    return finish


NATIVE_LOG_PREFIX = "lakehouse-native-"


def _remove_stale_native_logs() -> None:
    """Remove the native output logs of runs that are gone (a killed run cannot remove its own)."""
    import tempfile
    from pathlib import Path

    from pipeline.storage import process_alive

    for log in Path(tempfile.gettempdir()).glob(f"{NATIVE_LOG_PREFIX}*-*.log"):
        pid = log.name[len(NATIVE_LOG_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                log.unlink()


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors become one clear sentence and a non-zero exit code."""
    finish = _native_output_aside()
    try:
        _main(argv)
    except SystemExit as leaving:
        finish(leaving.code not in (0, None))
        raise
    except BaseException:
        finish(True)
        raise
    finish(False)


def _main(argv: list[str] | None) -> None:
    import signal
    import warnings

    # boto3 warns on every start under Python 3.9, which AWS Glue's Python shell still is.
    warnings.filterwarnings("ignore", message="Boto3 will no longer support Python")

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _on_signal)
    try:
        code = app(args=argv, standalone_mode=False)
    except LakehouseError as error:
        if _state["debug"]:
            raise
        # One line however long: logs (CloudWatch, CI) keep the sentence whole.
        console.print(f"[red]error:[/red] {escape(describe(error))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("interrupted: the batch is unfinished; `lakehouse run` resumes it", highlight=False)
        sys.exit(130)
    except Terminated as stop:
        console.print(
            f"stopped by signal {stop.signum}: the batch is unfinished; `lakehouse run` resumes it",
            highlight=False,
        )
        sys.exit(128 + stop.signum)
    except Exception as error:  # the CLI promises one sentence, not a traceback
        # Usage errors are click's ClickException, which typer 0.26+ vendors (typer._click) instead of
        # depending on click: known by what they do, not by their class.
        show, exit_code = getattr(error, "show", None), getattr(error, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        if _state["debug"]:
            raise
        console.print(
            f"[red]error:[/red] {escape(describe(error))} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
    # Without standalone mode, typer returns what it would have exited with (130 after Ctrl-C).
    if isinstance(code, int) and code:
        if code == 130:
            console.print("interrupted: the batch is unfinished; `lakehouse run` resumes it", highlight=False)
        sys.exit(code)
