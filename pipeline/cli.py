"""The ``lakehouse`` command: generate sample data, run a batch or one step, query the tables."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.errors import LakehouseError, describe

if TYPE_CHECKING:
    from pipeline.gates import GateSettings
    from pipeline.progress import Progress
    from pipeline.report import BatchReport, StepReport
    from pipeline.storage import Store

app = typer.Typer(
    help="E-commerce lakehouse: raw CSVs -> validated, deduplicated, partitioned Delta tables.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# Nothing printed is markup: roots, file names and errors print as they are (``s3://b/[x]``).
console = Console(stderr=True, markup=False)
out = Console(markup=False)
# One command's options and what its log has learnt (the batch); reset by each ``main``.
_state: dict[str, Any] = {}
LOG_FORMATS = ("auto", "text", "json")

ROOT_HELP = (
    "Lakehouse root: a local folder or s3://bucket[/prefix] (endpoint and credentials from AWS_* "
    "variables); default $LAKEHOUSE_ROOT."
)
ROOT_ENV = "LAKEHOUSE_ROOT"


def _root_option() -> Any:
    return typer.Option(..., "--root", help=ROOT_HELP, envvar=ROOT_ENV, show_envvar=False)


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("ecommerce-lakehouse")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown"
        out.print(f"lakehouse {number}", highlight=False, markup=False)
        raise typer.Exit()


def _log_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(LOG_FORMATS)}")
    return value


@app.callback()
def _options(
    context: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
    log_format: str = typer.Option(
        "auto",
        "--log-format",
        help="What goes to stderr while a command works: text for people, json lines for machines; "
        "auto: text on a terminal, json otherwise (Fargate, Glue, CI, a pipe).",
        callback=_log_format,
    ),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    _state["debug"] = debug
    _state["log_format"] = log_format
    _state["command"] = context.invoked_subcommand


def json_logs() -> bool:
    """Whether progress and errors go to stderr as JSON lines."""
    chosen = _state["log_format"]
    return bool(chosen == "json" or (chosen == "auto" and not console.is_terminal))


def log_event(level: str, event: str, message: str, **fields: Any) -> None:
    """One JSON object on one line of stderr: time, level, event, command, batch, message, fields."""
    import json
    from datetime import datetime, timezone

    _state["batch"] = fields.pop("batch", None) or _state["batch"]
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "level": level,
        "event": event,
        "command": _state["command"],
        "batch": _state["batch"],
        "message": message,
        "elapsed": round(time.monotonic() - _state["started"], 3),  # seconds since the command started
        **fields,
    }
    line = json.dumps(record, default=str) + "\n"
    with _LOG_LOCK:  # the heartbeat writes from its own thread: one whole line at a time
        sys.stderr.write(line)
        sys.stderr.flush()


# What a logged report leaves out: the rejected records' text (user data, kept in rejected/) and the
# maps that grow with the batch (a day or a file each); reports/<batch_id>.json has them all.
_UNLOGGED_STEP_FIELDS = ("rejected_samples", "rejected_by_partition", "rejected_by_file")


def _logged(report: BatchReport | StepReport) -> dict[str, Any]:
    """``report`` as a log event's field: its figures without the rejected rows' text or per-day maps."""
    fields = asdict(report)
    for step in fields.get("steps", [fields]):
        for name in _UNLOGGED_STEP_FIELDS:
            step.pop(name, None)
    return fields


_LOG_LOCK = threading.Lock()
HEARTBEAT_SECONDS = 30.0  # a JSON log says what a long stage is doing (and its memory) this often


def _memory() -> dict[str, float]:
    """The process's resident memory now and at its peak, in GiB (now: where /proc tells)."""
    import os
    import resource

    memory = {}
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as statm:
        memory["rss_gib"] = round(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    memory["peak_rss_gib"] = round(peak * (1 if sys.platform == "darwin" else 1024) / 2**30, 2)
    return memory


@contextlib.contextmanager
def _heartbeat(last: dict[str, str]) -> Iterator[None]:
    """Every HEARTBEAT_SECONDS, the last thing said and the memory: a task killed for memory has a log
    that shows it growing."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            log_event("info", "heartbeat", f"working: {last['message']}", **_memory())

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


READING_EVERY = 5.0  # seconds between two "reading" events of a table in a JSON log


@contextlib.contextmanager
def _working(first: str) -> Iterator[Progress]:
    """What a command reports while it works: a spinner and a bar per table being read on a terminal,
    a line per event when text goes to a pipe, a JSON object per event in a JSON log."""
    if json_logs():
        last_read: dict[str, float] = {}
        last = {"message": first}

        def as_json(message: str, /, **fields: Any) -> None:
            last["message"] = message
            event = fields.pop("event", "progress")
            if event == "reading":  # one a chunk: a few a table are enough for a log
                table, now = str(fields.get("table")), time.monotonic()
                if (
                    now - last_read.get(table, 0.0) < READING_EVERY
                    and fields["bytes"] < fields["total_bytes"]
                ):
                    return
                last_read[table] = now
            log_event("info", event, message, **fields)

        as_json(first, event="started")
        with _heartbeat(last):
            yield as_json
    elif console.is_terminal:
        from rich.console import Group
        from rich.live import Live
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bars
        from rich.spinner import Spinner

        status = Spinner("dots", text=Text(first, style="bold"))
        bars = Bars(
            TextColumn("  {task.description}", markup=False),
            BarColumn(bar_width=20),
            TaskProgressColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[rows]}", markup=False),
            TimeRemainingColumn(),
            console=console,
        )
        reading: dict[str, Any] = {}
        with Live(Group(status, bars), console=console, transient=True, refresh_per_second=8):

            def on_terminal(message: str, /, **fields: Any) -> None:
                if fields.get("event") == "reading":
                    table = str(fields["table"])
                    if table not in reading:
                        reading[table] = bars.add_task(table, total=fields["total_bytes"], rows="")
                    bars.update(reading[table], completed=fields["bytes"], rows=f"{fields['rows']:,} rows")
                # File names and errors are not markup: ``raw/[x].csv`` is shown as it is.
                status.update(text=Text(message, style="bold"))

            yield on_terminal
    else:

        def as_lines(message: str, /, **fields: Any) -> None:
            if fields.get("event") != "reading":
                console.print(Text(message), highlight=False, soft_wrap=True)

        as_lines(first)
        yield as_lines


def _store(root: str, *, must_exist: bool = True) -> Store:
    """The store of ``root``, checked before anything is written: a typo names no folder or bucket."""
    from pipeline.errors import UsageError
    from pipeline.storage import open_store

    store = open_store(root)
    if must_exist and not store.exists():
        raise UsageError(
            f"root {root} does not exist"
            + ("" if store.root in (root, root.rstrip("/")) else f" ({store.root})")
            + "; check --root (or $LAKEHOUSE_ROOT)"
        )
    return store


@app.command()
def generate(
    root: str = _root_option(),
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

    store = _store(root, must_exist=False)
    with _working("generating") as progress:
        if next_day:
            result = generate_next_day(
                store,
                scale=scale,
                seed=seed,
                dirty=not clean,
                progress=progress,
                product_limit=product_limit,
            )
        else:
            result = generate_full(store, scale=scale, seed=seed, dirty=not clean, progress=progress)
    for table, rows in result.rows.items():
        out.print(f"{table}: {rows:,} rows")
    out.print(f"{len(result.files)} files written under {store.uri('raw/')}", soft_wrap=True)


MEMORY_BUDGET_DEFAULT = "2.75GiB"
WORKERS_MEMORY_BUDGET = "256MiB"  # the distributed benchmark's units: several per table from scale 0.05 up
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


def _accept_gates_option() -> Any:
    return typer.Option(
        False,
        "--accept-gates",
        help="Land the batch even where a table crosses a fail gate (recorded as accepted in its report).",
    )


def _fail_percent_option() -> Any:
    return typer.Option(
        None,
        "--fail-percent",
        min=0,
        max=100,
        help="Fail a table whose rejected rows are more than this % of its rows in "
        "(default 10, or lakehouse.toml's).",
    )


def _warn_percent_option() -> Any:
    return typer.Option(
        None,
        "--warn-percent",
        min=0,
        max=100,
        help="Warn about a table whose rejected rows are more than this % of its rows in "
        "(default 1, or lakehouse.toml's).",
    )


def _gate_settings(
    store: Store, accept: bool, fail_percent: Optional[float], warn_percent: Optional[float]
) -> GateSettings:
    """The root's lakehouse.toml gates with the command line's on top."""
    from dataclasses import replace

    from pipeline.gates import load_settings

    settings = load_settings(store).with_limits(fail_percent=fail_percent, warn_percent=warn_percent)
    return replace(settings, accept=True) if accept else settings


@app.command()
def run(
    root: str = _root_option(),
    force: bool = typer.Option(
        False, "--force", help="Load files even if a succeeded batch loaded the same content already."
    ),
    memory_budget: str = typer.Option(
        MEMORY_BUDGET_DEFAULT, "--memory-budget", help=MEMORY_BUDGET_HELP, callback=_memory_budget
    ),
    accept_gates: bool = _accept_gates_option(),
    fail_percent: Optional[float] = _fail_percent_option(),
    warn_percent: Optional[float] = _warn_percent_option(),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="Run each step as the distributed path's stages, their units in this many processes "
        "(what Step Functions' Distributed Map does on AWS); default: each step in this process.",
    ),
) -> None:
    """Process one batch: every CSV now in ROOT/raw/ (or resume the unfinished batch)."""
    from pipeline.batch import run_batch

    store = _store(root)
    gates = _gate_settings(store, accept_gates, fail_percent, warn_percent)
    with _working("starting") as progress:
        report = run_batch(
            store,
            progress=progress,
            force=force,
            memory_budget=parse_size(memory_budget),
            gates=gates,
            workers=workers,
        )
    _print_summary(report)
    if json_logs():
        log_event("info", "batch_report", _batch_line(report), batch=report.batch_id, report=_logged(report))


@app.command()
def step(
    table: str = typer.Argument(..., help="products, orders or order_items."),
    root: str = _root_option(),
    manifest: str = typer.Option(
        ..., "--manifest", help="The batch manifest: a key under ROOT, its full URI, or a batch id."
    ),
    memory_budget: str = typer.Option(
        MEMORY_BUDGET_DEFAULT, "--memory-budget", help=MEMORY_BUDGET_HELP, callback=_memory_budget
    ),
    accept_gates: bool = _accept_gates_option(),
    fail_percent: Optional[float] = _fail_percent_option(),
    warn_percent: Optional[float] = _warn_percent_option(),
) -> None:
    """Run one table's step of a batch (what a Fargate task or Glue job runs)."""
    from pipeline.batch import load_step_report, run_step, save_step_report
    from pipeline.errors import StepError
    from pipeline.manifest import read_manifest
    from pipeline.report import forget_step_error, save_step_error
    from pipeline.specs import get_spec

    store = _store(root)
    spec = get_spec(table)
    batch = read_manifest(store, manifest)
    _state["batch"] = batch.batch_id
    done = load_step_report(store, batch.batch_id, spec.name)
    if done is not None:
        # A resumed batch runs every step again: a step that committed is not redone (its files may be
        # archived by now).
        out.print(f"step {table} of batch {batch.batch_id} is done already", highlight=False, soft_wrap=True)
        _print_steps([done])
        return
    with _working(f"{table}") as progress:
        try:
            report = run_step(
                store,
                batch,
                spec,
                progress=progress,
                memory_budget=parse_size(memory_budget),
                gates=_gate_settings(store, accept_gates, fail_percent, warn_percent),
            )
        except Exception as error:
            failure = StepError(table, error) if isinstance(error, LakehouseError) else error
            # On AWS the task's own failure says only that the container exited: the cause is kept here.
            with contextlib.suppress(Exception):
                save_step_error(store, batch.batch_id, spec.name, describe(failure))
            if failure is error:
                raise
            raise failure from error
    save_step_report(store, batch.batch_id, report)
    forget_step_error(store, batch.batch_id, spec.name)
    _print_steps([report])
    _print_gates([report])
    if json_logs():
        log_event(
            "info",
            "step_report",
            f"step {table} of batch {batch.batch_id} done",
            table=report.table,
            rows=report.rows_in,
            seconds=report.seconds,
            report=_logged(report),
        )


stage_app = typer.Typer(
    help="A step as separate stages and units (what the distributed path's tasks run).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(stage_app, name="stage")


@contextlib.contextmanager
def _cause_kept(store: Store, batch_id: str, table: str) -> Iterator[None]:
    """On failure, keep the cause where FinishBatch finds a step's (the task itself says only 'exit 1')."""
    from pipeline.errors import StepError
    from pipeline.report import save_step_error

    try:
        yield
    except Exception as error:
        failure = StepError(table, error) if isinstance(error, LakehouseError) else error
        with contextlib.suppress(Exception):
            save_step_error(store, batch_id, table, describe(failure))
        if failure is error:
            raise
        raise failure from error


@stage_app.command("plan")
def stage_plan(
    table: str = typer.Argument(..., help="products, orders or order_items."),
    stage: str = typer.Argument(..., help="parse, resolve or write (which plans moves and late too)."),
    root: str = _root_option(),
    manifest: str = typer.Option(
        ..., "--manifest", help="The batch manifest: a key under ROOT, its full URI, or a batch id."
    ),
    memory_budget: str = typer.Option(
        MEMORY_BUDGET_DEFAULT,
        "--memory-budget",
        help="Memory of one unit's task: sizes the buckets and groups (parse plan only).",
        callback=_memory_budget,
    ),
    accept_gates: bool = _accept_gates_option(),
    fail_percent: Optional[float] = _fail_percent_option(),
    warn_percent: Optional[float] = _warn_percent_option(),
) -> None:
    """Write the work items of a stage under ROOT/plan/<batch>/<table>/<stage>/ (the gates: write plan)."""
    from pipeline.distributed import PLANNED, plan_stage
    from pipeline.manifest import read_manifest
    from pipeline.specs import get_spec

    if stage not in PLANNED:
        raise typer.BadParameter(f"no plan for {stage!r}; plans are {', '.join(PLANNED)}", param_hint="STAGE")
    store = _store(root)
    spec = get_spec(table)
    batch = read_manifest(store, manifest)
    _state["batch"] = batch.batch_id
    with _cause_kept(store, batch.batch_id, spec.name):
        items = plan_stage(
            store,
            batch,
            spec,
            stage,
            memory_budget=parse_size(memory_budget),
            gates=_gate_settings(store, accept_gates, fail_percent, warn_percent)
            if stage == "write"
            else None,
        )
    out.print(f"{table} {stage}: {len(items)} work item(s) planned", highlight=False, soft_wrap=True)


@stage_app.command("run")
def stage_run(
    item: str = typer.Argument(
        ...,
        help="A work item: its key under ROOT (plan/<batch>/<table>/<stage>/N.json), or its full URI.",
    ),
    root: str = _root_option(),
) -> None:
    """Run the unit a work item names (skipped when its report says it is done); its report on stdout."""
    import json

    from pipeline.distributed import run_unit

    store = _store(root)
    # A Distributed Map's child knows its item by the object's full location (what S3 listed).
    at_root = store.uri("plan")[: -len("plan")]
    if item.startswith(at_root):
        item = item[len(at_root) :]
    parts = item.split("/")
    if len(parts) != 5 or parts[0] != "plan":
        raise typer.BadParameter(
            f"{item!r} is not a work item key (plan/<batch>/<table>/<stage>/<unit>.json)", param_hint="ITEM"
        )
    _state["batch"] = parts[1]
    with _cause_kept(store, parts[1], parts[2]):
        report = run_unit(store, item)
    if json_logs():
        log_event("info", "unit_report", f"{parts[2]} {parts[3]} unit {parts[4]} done", report=report)
    # The report on stdout whatever the log format: one JSON line, for a script (or a Map's child).
    print(json.dumps(report))


@stage_app.command("finish")
def stage_finish(
    table: str = typer.Argument(..., help="products, orders or order_items."),
    root: str = _root_option(),
    manifest: str = typer.Option(
        ..., "--manifest", help="The batch manifest: a key under ROOT, its full URI, or a batch id."
    ),
) -> None:
    """Commit a step's staged rejected rows and write its report from its units' (after the last stage)."""
    from pipeline.batch import load_step_report
    from pipeline.distributed import finish_step
    from pipeline.manifest import read_manifest
    from pipeline.report import forget_step_error
    from pipeline.specs import get_spec

    store = _store(root)
    spec = get_spec(table)
    batch = read_manifest(store, manifest)
    _state["batch"] = batch.batch_id
    report = load_step_report(store, batch.batch_id, spec.name)
    if report is None:
        with _cause_kept(store, batch.batch_id, spec.name), _working(f"{table}") as progress:
            report = finish_step(store, batch, spec, progress=progress)
        forget_step_error(store, batch.batch_id, spec.name)
    _print_steps([report])
    _print_gates([report])


QUERY_FORMATS = ("table", "csv", "json")


def _query_format(value: str) -> str:
    if value not in QUERY_FORMATS:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(QUERY_FORMATS)}")
    return value


@app.command()
def query(
    sql: str = typer.Argument(
        ..., help="Polars SQL over products, orders, order_items and rejected_<table>."
    ),
    root: str = _root_option(),
    limit: int = typer.Option(50, "--limit", min=0, help="Rows to return at most (0: all)."),
    output: str = typer.Option(
        "table", "--format", help="table, csv or json (one object per row).", callback=_query_format
    ),
) -> None:
    """Run SQL over the lakehouse tables (the local stand-in for Athena)."""
    import polars as pl

    from pipeline.query import run_query

    # One row more than shown: whether the result was cut, without running the query to its end.
    result = run_query(_store(root), sql, limit=limit + 1 if limit else None)
    cut = bool(limit) and result.height > limit
    if cut:
        result = result.head(limit)
    if output == "csv":
        sys.stdout.write(result.write_csv())
    elif output == "json":
        sys.stdout.write(result.write_ndjson())
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=40, tbl_width_chars=out.width):
            out.print(str(result), highlight=False, markup=False)
    if cut:
        console.print(f"(the first {limit} rows; --limit 0 for all)", highlight=False, markup=False)


@app.command()
def status(
    root: str = _root_option(),
    last: int = typer.Option(10, "--last", min=1, help="How many batches to list."),
) -> None:
    """The last batches: status (unfinished: steps done of all), rows in, written, rejected, duration."""
    from pipeline.report import batch_history

    lines = batch_history(_store(root), last)
    if not lines:
        out.print(f"no batch has run under {root} yet", highlight=False, markup=False)
        return
    table = Table(title="batches", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in ("batch", "status", "rows in", "written", "rejected", "seconds"):
        left = header in ("batch", "status")
        table.add_column(header, justify="left" if left else "right", overflow="fold")
    for line in lines:
        table.add_row(
            line.batch_id,
            line.status if line.status != "unfinished" else f"unfinished {line.steps_done}/{line.steps}",
            f"{line.rows_in:,}",
            f"{line.written:,}",
            f"{line.rejected:,}",
            "-" if line.seconds is None else f"{line.seconds:.1f}",
        )
    out.print(table)


@app.command()
def history(
    table: str = typer.Argument(..., help="products, orders, order_items or rejected_<table>."),
    root: str = _root_option(),
    limit: int = typer.Option(20, "--limit", min=1, help="How many versions, newest first."),
) -> None:
    """A table's versions, newest first: when, the operation, the batch that wrote it, rows and files."""
    from pipeline import delta
    from pipeline.batch import rejected_uri, table_uri
    from pipeline.catalog import catalog_name
    from pipeline.errors import UsageError
    from pipeline.specs import TABLES

    store = _store(root)
    names = {catalog_name(name): table_uri(store, name) for name in TABLES}
    names.update({catalog_name(name, rejected=True): rejected_uri(store, name) for name in TABLES})
    if table not in names:
        raise UsageError(f"unknown table {table!r}; the tables are {', '.join(names)}")
    commits = delta.history(names[table], limit)
    if not commits:
        out.print(f"{table} has no versions under {root} yet", highlight=False, markup=False)
        return
    listing = Table(title=f"{table}: versions", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in ("version", "time (UTC)", "operation", "batch", "rows", "files +/-"):
        listing.add_column(
            header,
            justify="right" if header in ("version", "files +/-") else "left",
            overflow="fold",
            no_wrap=header == "batch",
        )
    for commit in commits:
        listing.add_row(
            str(commit.version),
            commit.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
            commit.operation,
            commit.batch_id or "-",
            ", ".join(f"{count:,} {name}" for name, count in commit.rows.items()) or "-",
            f"+{commit.files_added:,} -{commit.files_removed:,}",
        )
    out.print(listing)


def _contract_format(value: str) -> str:
    if value not in ("json", "yaml"):
        raise typer.BadParameter(f"{value!r} is not json or yaml")
    return value


@app.command()
def contract(
    output_format: str = typer.Option(
        "json", "--format", help="json or yaml.", callback=_contract_format, metavar="FORMAT"
    ),
) -> None:
    """The tables' contract for consumers: each table's pandera schema and a JSON Schema of its rows."""
    from pipeline.contract import contract_document

    typer.echo(contract_document(output_format), nl=output_format != "yaml")


@app.command()
def report(
    root: str = _root_option(),
    batch: Optional[str] = typer.Option(
        None, "--batch", help="A finished batch's id (default: the last one)."
    ),
    last: int = typer.Option(10, "--last", min=1, help="Batches in the trend: this one and those before it."),
    out_file: str = typer.Option(..., "--out", help="The HTML file to write (- for stdout)."),
) -> None:
    """A finished batch's quality report as one self-contained HTML file (charts drawn offline)."""
    from pathlib import Path

    from pipeline.errors import UsageError
    from pipeline.html_report import render, reports_until

    target = None if out_file == "-" else Path(out_file)
    if target is not None and not target.parent.is_dir():
        raise UsageError(f"--out {out_file}: the folder {target.parent} does not exist")
    reports = reports_until(_store(root), batch, last)
    page = render(reports)
    if target is None:
        sys.stdout.write(page)
        return
    target.write_text(page, encoding="utf-8")
    console.print(
        f"wrote {out_file}: batch {reports[-1].batch_id}, the trend over {len(reports)} batch(es)",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@app.command()
def cost(
    root: str = _root_option(),
    batch: Optional[str] = typer.Option(
        None, "--batch", help="A finished batch's id (default: the last one)."
    ),
    runner: str = typer.Option("fargate", "--runner", help="fargate or glue."),
    cpu: int = typer.Option(1024, "--cpu", min=256, help="Fargate vCPU units (1024 = 1 vCPU)."),
    memory: int = typer.Option(4096, "--memory", min=512, help="Fargate memory in MiB."),
    disk: int = typer.Option(21, "--disk", min=20, help="Fargate ephemeral storage in GiB."),
    architecture: str = typer.Option("arm64", "--architecture", help="arm64 or x86_64."),
    spot: bool = typer.Option(False, "--spot", help="Fargate Spot."),
    glue_dpu: float = typer.Option(
        1.0, "--glue-dpu", help="DPU of the Glue Python-shell jobs (0.0625 or 1)."
    ),
    crawls: int = typer.Option(
        0, "--crawls", min=0, help="Crawls to count in (a batch that creates or changes a table runs 1 or 2)."
    ),
) -> None:
    """What a finished batch would cost on AWS at another task size: its measured step seconds, priced."""
    from pipeline.costs import TaskSize, cost_line, glue_spark_cost, repriced
    from pipeline.errors import UsageError
    from pipeline.report import batch_history, load_report

    if runner not in ("fargate", "glue"):
        raise UsageError(f"--runner must be fargate or glue, not {runner!r}")
    if architecture not in ("arm64", "x86_64"):
        raise UsageError(f"--architecture must be arm64 or x86_64, not {architecture!r}")
    store = _store(root)
    if batch is None:
        finished = [line for line in batch_history(store, 1_000) if line.status != "unfinished"]
        if not finished:
            raise UsageError(f"no batch has finished under {root} yet")
        batch = finished[0].batch_id
    report = load_report(store, batch)
    if report is None:
        raise UsageError(f"batch {batch} has no report under {root} (unfinished, or no such batch)")
    if "raw_bytes" not in report.cost.get("usage", {}):
        raise UsageError(f"batch {batch}'s report holds no cost figures (written by an older version)")
    task = TaskSize(runner, cpu / 1024, memory / 1024, disk, architecture, spot, glue_dpu)
    estimate = repriced(report.steps, report.cost, task, crawls)
    out.print(f"batch {batch}: {cost_line(estimate.to_dict())}", highlight=False, markup=False)
    floor, typical = glue_spark_cost(dpu=2, job_seconds=60), glue_spark_cost()
    out.print(
        f"the original design on Glue Spark, a crawl every batch: ${floor:.4f} at its least (3 jobs of "
        f"2 DPU for a minute), ${typical:.4f} at its default 10 DPU for 2 minutes a job",
        highlight=False,
        markup=False,
    )


@app.command()
def maintain(
    root: str = _root_option(),
    retention_hours: int = typer.Option(
        168,
        "--retention-hours",
        help="Vacuum files unreferenced for this long (at least the table's retention).",
    ),
) -> None:
    """Compact small files, vacuum old ones and checkpoint every lakehouse and rejected table."""
    from pipeline.batch import maintain_tables

    store = _store(root)
    with _working("maintaining") as progress:
        results = maintain_tables(store, retention_hours=retention_hours, progress=progress)
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
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="Instead: the distributed path's benchmark, its units as 1 and N processes, and 3x the batch.",
    ),
    memory_budget: str = typer.Option(
        WORKERS_MEMORY_BUDGET,
        "--memory-budget",
        help="With --workers: one unit's budget.",
        callback=_memory_budget,
    ),
) -> None:
    """Benchmark: floor, full load and input shapes, daily batch, replay, growth, maintenance."""
    from pipeline.bench import SHAPES, print_figures, print_worker_figures, run_bench, run_workers_bench

    if workers is not None:
        with _working("benchmark of the distributed path") as progress:
            figures = run_workers_bench(
                scale=scale,
                workers=workers,
                root=root,
                seed=seed,
                memory_budget=memory_budget,
                progress=progress,
            )
        print_worker_figures(figures, out)
        _write_figures(figures, json_file)
        return

    chosen = None if shapes is None else [name.strip() for name in shapes.split(",") if name.strip()]
    if chosen == ["none"]:
        chosen = []
    unknown = [name for name in chosen or [] if name not in SHAPES]
    if unknown:
        raise typer.BadParameter(
            f"unknown input shape {unknown[0]!r}; the shapes are: {', '.join(SHAPES)}", param_hint="--shapes"
        )
    with _working("benchmark") as progress:
        figures = run_bench(
            scale=scale,
            small_scale=small_scale,
            root=root,
            seed=seed,
            shapes=chosen,
            triple=triple,
            progress=progress,
        )
    print_figures(figures, out)
    _write_figures(figures, json_file)


def _write_figures(figures: dict[str, Any], json_file: str | None) -> None:
    if json_file:
        import json
        from pathlib import Path

        Path(json_file).write_text(json.dumps(figures, indent=2))
        out.print(f"figures written to {json_file}")


@app.command()
def unlock(
    root: str = _root_option(),
    force: bool = typer.Option(False, "--force", help="Remove the lock even if its holder may still run."),
) -> None:
    """Remove the batch lock left by a run that died (a live holder's only with --force)."""
    from pipeline.lock import unlock as remove_lock

    store = _store(root)
    holder = remove_lock(store, force=force)
    if holder is None:
        out.print(f"{store.root} is not locked", highlight=False, soft_wrap=True)
        return
    out.print(
        f"removed the lock of {store.root} (batch {holder.get('batch', '?')})",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def abandon(
    batch_id: str = typer.Argument(..., help="The unfinished batch to give up (its id or manifest)."),
    root: str = _root_option(),
) -> None:
    """Give up an unfinished batch: remove its manifest, rejected rows and step reports."""
    from pipeline.batch import abandon_batch

    done = abandon_batch(_store(root), batch_id)
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


TOP_REASONS = 5
WIDE = 110


def _print_steps(steps: list[StepReport]) -> None:
    """The rows per table and the top reasons per table; at 80 columns (a pipe, CloudWatch) no figure
    is cut, and a wide terminal also shows files and versions."""
    wide = out.width >= WIDE
    headers = ["table", "rows in", "inserted", "updated", "unchanged", "rejected", "seconds"]
    if wide:
        headers[1:1] = ["files"]
        headers[-1:-1] = ["version"]
    table = Table(title="rows per table", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for header in headers:
        table.add_column(header, justify="left" if header == "table" else "right", overflow="fold")
    for s in steps:
        version = "-" if s.delta_version is None else str(s.delta_version)
        figures = [s.rows_in, s.inserted, s.updated, s.unchanged, s.rejected]
        cells = [s.table, *(f"{n:,}" for n in figures), f"{s.seconds:.2f}"]
        if wide:
            cells[1:1] = [str(s.files)]
            cells[-1:-1] = [version]
        table.add_row(*cells)
    out.print(table)
    reasons = Table(
        title="rejected rows: top reasons", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False
    )
    for header in ("table", "reason", "rows"):
        reasons.add_column(header, justify="right" if header == "rows" else "left", overflow="fold")
    several = False
    for s in steps:
        ranked = sorted(s.rejected_by_reason.items(), key=lambda item: (-item[1], item[0]))
        for reason, count in ranked[:TOP_REASONS]:
            reasons.add_row(s.table, reason, f"{count:,}")
        rest = ranked[TOP_REASONS:]
        if rest:
            reasons.add_row(s.table, f"{len(rest)} other reasons", f"{sum(c for _, c in rest):,}")
        several |= sum(s.rejected_by_reason.values()) > s.rejected
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
        if several:
            out.print(
                "a row can have several reasons: the counts add up to more than the rows rejected "
                "(all of them: `lakehouse query` over rejected_<table>)",
                highlight=False,
                markup=False,
            )


def _print_summary(report: BatchReport) -> None:
    _print_steps(report.steps)
    _print_gates(report.steps)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    out.print(_batch_line(report), highlight=False, markup=False)
    if report.cost:
        from pipeline.costs import cost_line

        out.print(f"cost on AWS: {cost_line(report.cost)}", highlight=False, markup=False)


def _print_gates(steps: list[StepReport]) -> None:
    from pipeline.report import gate_notices

    for notice in gate_notices(steps):
        out.print(f"gate: {notice}", highlight=False, markup=False, soft_wrap=True)


def _batch_line(report: BatchReport) -> str:
    return (
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
        if failed and size and _state and json_logs():
            log_event("info", "native_output", f"native library output of this run: {log}", path=log)
        elif failed and size:
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
    _state.update(debug=False, log_format="auto", batch=None, command=None, started=time.monotonic())
    try:
        code = app(args=argv, standalone_mode=False)
    except LakehouseError as error:
        if _state["debug"]:
            raise
        _say_error(describe(error), type(error).__name__)
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _say_stopped("interrupted: the batch is unfinished; `lakehouse run` resumes it")
        sys.exit(130)
    except Terminated as stop:
        _say_stopped(f"stopped by signal {stop.signum}: the batch is unfinished; `lakehouse run` resumes it")
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
        _say_error(f"{describe(error)} (run with --debug for the traceback)", type(error).__name__)
        sys.exit(1)
    # Without standalone mode, typer returns what it would have exited with (130 after Ctrl-C).
    if isinstance(code, int) and code:
        if code == 130:
            _say_stopped("interrupted: the batch is unfinished; `lakehouse run` resumes it")
        sys.exit(code)


def _say_error(sentence: str, kind: str) -> None:
    if json_logs():
        log_event("error", "failed", sentence, error=kind)
    else:
        # One line however long: logs (CloudWatch, CI) keep the sentence whole.
        console.print(Text.assemble(("error:", "red"), " ", sentence), highlight=False, soft_wrap=True)


def _say_stopped(sentence: str) -> None:
    if json_logs():
        log_event("warning", "stopped", sentence)
    else:
        console.print(Text(sentence), highlight=False)
