"""The benchmark: how close a full load is to the hardware floor, and what a daily batch costs.

Every measured phase runs in a child process of its own, so its wall time, CPU time and peak
resident memory (``wait4``: the child and anything it waited for) are its alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from pipeline.progress import Progress
from pipeline.specs import TABLES

GIB = 1 << 30
EXTRA_DAYS = 5


def _measure(name: str, argv: list[str], workdir: Path, rows: int | None = None) -> dict[str, Any]:
    """Run ``argv`` as a child process and take its wall, CPU and peak RSS."""
    log = workdir / f"{name.replace(' ', '_')}.log"
    with log.open("wb") as output:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = (
            os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status
        )
    if child.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"benchmark phase {name!r} failed: {' / '.join(tail)}")
    return {
        "phase": name,
        "rows": rows,
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),  # Linux reports KiB
        "rows_per_s": round(rows / wall) if rows else None,
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def _internal(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.bench", *args]


def _latest_report(root: Path) -> dict[str, Any]:
    reports = sorted((root / "reports").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return dict(json.loads(reports[-1].read_text()))


def _rows_in(report: dict[str, Any]) -> int:
    return sum(step["rows_in"] for step in report["steps"])


def _versions(report: dict[str, Any]) -> dict[str, int | None]:
    return {step["table"]: step["delta_version"] for step in report["steps"]}


def _data_files(root: Path) -> int:
    """Data files the lakehouse tables reference now."""
    from pipeline import delta

    return sum(delta.data_file_count(str(root / "lakehouse-dwh" / name)) for name in TABLES)


def _restore_batch(root: Path, batch_id: str) -> None:
    """Put a finished batch's archived files back into ``raw/`` (to replay it)."""
    for table in TABLES:
        for path in sorted((root / "archived" / table / batch_id).glob("*.csv")):
            shutil.copy(path, root / "raw" / table / path.name)


def _copy_batch(source: Path, batch_id: str, target: Path) -> None:
    for table in TABLES:
        (target / "raw" / table).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / "archived" / table / batch_id).glob("*.csv")):
            shutil.copy(path, target / "raw" / table / path.name)


# Input shapes of the same batch, each a rewrite of the generated files (which write `T`, whole seconds,
# LF, several files per table, quotes only around empty fields). A rewrite works on bytes, so dirty rows
# stay dirty and every shape must load the same tables (timestamps aside, where the shape adds a fraction).
_STAMP = re.compile(rb"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}:[0-9]{2}:[0-9]{2})")
SHAPES: dict[str, Callable[[bytes], bytes]] = {
    "space": lambda block: _STAMP.sub(rb"\1 \2", block),
    "fraction-z": lambda block: _STAMP.sub(rb"\1T\2.123Z", block),
    "space-micros-offset": lambda block: _STAMP.sub(rb"\1 \2.123456+00:00", block),
    "crlf": lambda block: block.replace(b"\n", b"\r\n"),
    "quoted": lambda block: _quoted(block),
    "one-file": lambda block: block,
}
SHAPE_BLOCK = 64 << 20


def _quoted(block: bytes) -> bytes:
    """Every field quoted. The generator's only quotes are empty quoted fields (``""``): they become
    empty first, so that each field keeps its meaning."""
    fields = block[:-1].replace(b'""', b"").replace(b",", b'","').replace(b"\n", b'"\n"')
    return b'"' + fields + b'"\n'


def reshape(source: Path, target: Path, shape: str) -> None:
    """Write ``source``'s raw files into ``target`` in ``shape`` (see ``SHAPES``; ``a+b``: both), block by
    block."""
    rewrites = [SHAPES[name] for name in shape.split("+")]

    def rewrite(block: bytes) -> bytes:
        for each in rewrites:
            block = each(block)
        return block

    for table in TABLES:
        (target / "raw" / table).mkdir(parents=True, exist_ok=True)
        paths = sorted((source / "raw" / table).glob("*.csv"))
        # one-file: every file with the first file's header, appended under that header; others as they are.
        first_header = _header(paths[0]) if paths else b""
        joined = target / "raw" / table / f"{table}-all.csv"
        for path in paths:
            into_one = "one-file" in shape.split("+") and _header(path) == first_header
            out = joined if into_one else target / "raw" / table / path.name
            skip_header = into_one and out.exists()
            with path.open("rb") as handle, out.open("ab" if into_one else "wb") as output:
                if skip_header:
                    handle.readline()
                block = b""
                while block := handle.read(SHAPE_BLOCK):
                    block += handle.readline()  # whole lines only
                    output.write(rewrite(block) if block.endswith(b"\n") else rewrite(block + b"\n")[:-1])
                if into_one and output.tell() and not block.endswith(b"\n"):
                    output.write(b"\n")  # the next file's first line must not join this one's last


def _stages(report: dict[str, Any]) -> dict[str, Any]:
    """Per step: its buckets and groups, and each stage's seconds and the peak memory by its end."""
    return {
        step["table"]: {
            "buckets": step.get("buckets", 1),
            "groups": step.get("groups", 1),
            **step.get("stages", {}),
        }
        for step in report["steps"]
    }


def _link_raw(source: Path, target: Path) -> None:
    """``source``'s raw files in ``target`` as hard links (a copy where links are refused)."""
    for path in sorted((source / "raw").rglob("*.csv")):
        linked = target / path.relative_to(source)
        linked.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, linked)
        except OSError:
            shutil.copy(path, linked)


def _header(path: Path) -> bytes:
    with path.open("rb") as handle:
        return handle.readline()


def _duckdb_phase(source: Path, out: Path, logs: Path, progress: Progress) -> dict[str, Any] | None:
    """The same rules as a DuckDB SQL pipeline over ``source``'s raw files (None: duckdb not installed)."""
    try:
        import duckdb  # noqa: F401
    except ImportError:
        progress("DuckDB side by side: skipped (pip install -e '.[bench]')")
        return None
    progress("DuckDB pipeline of the same rules")
    if out.exists():
        shutil.rmtree(out)
    phase = _measure("DuckDB, same rules", _internal("duckdb", str(source / "raw"), str(out)), logs)
    log = (logs / "DuckDB,_same_rules.log").read_text().strip().splitlines()
    phase["kept"] = {table: counts["kept"] for table, counts in json.loads(log[-1]).items()}
    shutil.rmtree(out)
    return phase


def _same_kept(kept: dict[str, int], report: dict[str, Any]) -> str:
    """Whether DuckDB kept as many rows per table as the pipeline wrote (a check that the rules agree)."""
    ours = {step["table"]: step["inserted"] + step["updated"] + step["unchanged"] for step in report["steps"]}
    if kept == ours:
        return "same rows kept"
    return "rows kept differ: " + ", ".join(f"{t} {kept.get(t)} vs {ours.get(t)}" for t in ours)


def _shape_phases(
    base: Path, source: Path, shapes: list[str], logs: Path, progress: Progress
) -> list[dict[str, Any]]:
    """Floor and full load of the same batch in each input shape, each in a lake of its own."""
    phases = []
    for shape in shapes:
        progress(f"input shape: {shape}")
        lake = base / f"shape-{shape}"
        if lake.exists():
            shutil.rmtree(lake)
        _measure(f"reshape {shape}", _internal("reshape", str(source), str(lake), shape), logs)
        floor = _measure(f"floor, {shape}", _internal("floor", str(lake), str(lake / "floor")), logs)
        full = _measure(f"full load, {shape}", _cli("run", "--root", str(lake)), logs)
        rows = _rows_in(_latest_report(lake))
        for figure in (floor, full):
            figure["rows"], figure["rows_per_s"] = rows, round(rows / figure["wall_s"])
        full["note"] = f"{full['wall_s'] / floor['wall_s']:.2f}x its floor"
        phases += [floor, full]
        shutil.rmtree(lake)
    return phases


def run_bench(
    *,
    scale: float,
    small_scale: float = 0.1,
    root: str | None = None,
    seed: int = 42,
    shapes: list[str] | None = None,
    triple: bool = False,
    progress: Progress,
) -> dict[str, Any]:
    """Run every phase and return the figures (see the README's benchmark section)."""
    from pipeline.generate import PRODUCTS_AT_SCALE_1

    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="lakehouse-bench-"))
    big, small, logs = base / "lake", base / "small-lake", base / "logs"
    for path in (big, small):
        if path.exists():
            shutil.rmtree(path)
    logs.mkdir(parents=True, exist_ok=True)
    phases: list[dict[str, Any]] = []

    progress(f"generating scale {scale}")
    generated = _measure(
        "generate", _cli("generate", "--root", str(big), "--scale", str(scale), "--seed", str(seed)), logs
    )
    # The input shapes first: they are rewrites of the batch as generated, before it is archived.
    shape_phases = _shape_phases(base, big, list(SHAPES) if shapes is None else shapes, logs, progress)
    progress("floor: typed read + Parquet write")
    floor = _measure("floor", _internal("floor", str(big), str(base / "floor")), logs)
    progress("full load in one piece (a budget that stages nothing)")
    whole = base / "whole"
    _link_raw(big, whole)
    unstaged = _measure(
        "full load, unstaged", _cli("run", "--root", str(whole), "--memory-budget", "1TiB"), logs
    )
    unstaged_report = _latest_report(whole)
    shutil.rmtree(whole)
    duckdb = _duckdb_phase(big, base / "duckdb", logs, progress)
    # The re-export: the same rows in other bytes (a space in timestamps, CRLF), landed once loaded.
    reexport_source = base / "reexport"
    if reexport_source.exists():
        shutil.rmtree(reexport_source)
    _measure("reshape re-export", _internal("reshape", str(big), str(reexport_source), "space+crlf"), logs)
    progress("full load")
    full = _measure("full load", _cli("run", "--root", str(big)), logs)
    full_report = _latest_report(big)
    rows_total = _rows_in(full_report)  # the floor reads the very same files
    floor["rows"], full["rows"] = rows_total, rows_total
    for figure in (floor, full, unstaged, *([duckdb] if duckdb else [])):
        figure["rows"], figure["rows_per_s"] = rows_total, round(rows_total / figure["wall_s"])
    full["note"] = f"{full['wall_s'] / floor['wall_s']:.2f}x its floor; default --memory-budget"
    unstaged["note"] = f"{unstaged['wall_s'] / floor['wall_s']:.2f}x the floor"
    if duckdb:
        duckdb["note"] = (
            f"full load: {full['wall_s'] / duckdb['wall_s']:.2f}x this (target 0.75x); "
            + _same_kept(duckdb.pop("kept"), full_report)
        )
    progress("re-export of the whole batch into the loaded lake")
    for path in sorted((reexport_source / "raw").rglob("*.csv")):
        shutil.move(str(path), str(big / path.relative_to(reexport_source)))
    shutil.rmtree(reexport_source)
    reexport = _measure("re-export", _cli("run", "--root", str(big)), logs)
    reexport_report = _latest_report(big)
    reexport["rows"] = _rows_in(reexport_report)
    reexport["rows_per_s"] = round(reexport["rows"] / reexport["wall_s"])
    reexport_vs_full = round(reexport["wall_s"] / full["wall_s"], 2)
    reexport["note"] = f"{reexport_vs_full}x the full load (target 1.5x); " + (
        "no new version of any lakehouse table"
        if _versions(reexport_report) == _versions(full_report)
        else "lakehouse tables changed (unexpected)"
    )
    phases += [generated, floor, full, unstaged, *([duckdb] if duckdb else []), reexport, *shape_phases]
    growth: dict[str, float] = {}
    if triple:
        progress(f"the batch three times over (scale {3 * scale})")
        thrice = base / "thrice"
        if thrice.exists():
            shutil.rmtree(thrice)
        _measure(
            "generate 3x",
            _cli("generate", "--root", str(thrice), "--scale", str(3 * scale), "--seed", str(seed)),
            logs,
        )
        tripled = _measure("full load, 3x", _cli("run", "--root", str(thrice)), logs)
        tripled["rows"] = _rows_in(_latest_report(thrice))
        tripled["rows_per_s"] = round(tripled["rows"] / tripled["wall_s"])
        growth = {
            "rows": round(tripled["rows"] / rows_total, 2),
            "wall": round(tripled["wall_s"] / full["wall_s"], 2),
            "peak_rss": round(tripled["peak_rss_gib"] / full["peak_rss_gib"], 2),
        }
        tripled["note"] = (
            f"{growth['rows']}x the rows: {growth['wall']}x the time (target 3.3x), "
            f"{growth['peak_rss']}x the peak (target 1.25x)"
        )
        phases.append(tripled)
        shutil.rmtree(thrice)

    progress("generating the daily batch")
    products_small = max(10, round(PRODUCTS_AT_SCALE_1 * small_scale))
    _measure(
        "generate day",
        [
            *_cli("generate", "--root", str(big), "--scale", str(scale), "--seed", str(seed), "--next-day"),
            "--product-limit",
            str(products_small),
        ],
        logs,
    )
    progress("daily batch")
    daily = _measure("daily batch", _cli("run", "--root", str(big)), logs)
    day_report = _latest_report(big)
    daily["rows"] = _rows_in(day_report)
    daily["rows_per_s"] = round(daily["rows"] / daily["wall_s"])
    phases.append(daily)

    progress("replay of the daily batch")
    _restore_batch(big, day_report["batch_id"])
    # --force: the same content again is skipped otherwise; the MERGE itself must change nothing.
    replay = _measure("replay", _cli("run", "--root", str(big), "--force"), logs)
    replay_report = _latest_report(big)
    replay["rows"] = _rows_in(replay_report)
    replay["rows_per_s"] = round(replay["rows"] / replay["wall_s"])
    replay["note"] = (
        "no new commit"
        if _versions(replay_report) == _versions(day_report)
        else "tables changed (unexpected)"
    )
    phases.append(replay)

    progress(f"growth: the same daily batch into a scale-{small_scale} lake")
    _measure(
        "generate small",
        _cli("generate", "--root", str(small), "--scale", str(small_scale), "--seed", str(seed)),
        logs,
    )
    _measure("full load small", _cli("run", "--root", str(small)), logs)
    _copy_batch(big, day_report["batch_id"], small)
    grown = _measure(f"daily batch into scale {small_scale}", _cli("run", "--root", str(small)), logs)
    grown["rows"] = _rows_in(_latest_report(small))
    grown["rows_per_s"] = round(grown["rows"] / grown["wall_s"])
    phases.append(grown)

    progress(f"{EXTRA_DAYS} more daily batches (late orders leave small files in old partitions)")
    for number in range(EXTRA_DAYS):
        generate_day = _cli(
            "generate", "--root", str(big), "--scale", str(scale), "--seed", str(seed + number)
        )
        _measure("generate day", [*generate_day, "--next-day"], logs)
        _measure("daily batch", _cli("run", "--root", str(big)), logs)

    progress("read speed before and after maintenance")
    files_before = _data_files(big)
    before = _measure("scan before maintain", _internal("scan", str(big)), logs)
    maintain = _measure("maintain", _cli("maintain", "--root", str(big), "--retention-hours", "168"), logs)
    after = _measure("scan after maintain", _internal("scan", str(big)), logs)
    before["note"] = f"{files_before:,} data files"
    after["note"] = f"{_data_files(big):,} data files"
    phases += [before, maintain, after]

    progress("hostile files: a very wide header, quotes that never close")
    phases += _hostile_phases(base / "hostile", logs)

    return {
        "scale": scale,
        "small_scale": small_scale,
        "root": str(base),
        "cpus": os.cpu_count(),
        "phases": phases,
        "full_load_vs_floor": round(full["wall_s"] / floor["wall_s"], 2),
        "full_load_vs_duckdb": round(full["wall_s"] / duckdb["wall_s"], 2) if duckdb else None,
        "reexport_vs_full_load": reexport_vs_full,
        "growth_ratio": round(daily["wall_s"] / grown["wall_s"], 2),
        "three_times_over": growth,
        "stages": {"full load": _stages(full_report), "full load, unstaged": _stages(unstaged_report)},
        # The contract check runs in the merge's thread beside the late rejects: its seconds are an upper
        # bound of what it adds to the wall time.
        "contract_check_s": round(sum(step.get("contract_seconds", 0.0) for step in full_report["steps"]), 2),
        "contract_check_share": round(
            sum(step.get("contract_seconds", 0.0) for step in full_report["steps"]) / full["wall_s"], 4
        ),
        "shapes_vs_floor": {
            phase["phase"].removeprefix("full load, "): round(phase["wall_s"] / floor_of["wall_s"], 2)
            for floor_of, phase in zip(shape_phases[::2], shape_phases[1::2])
        },
    }


def _worker_figures(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per table and stage of a distributed run: its units and the largest peak memory of one of them."""
    return {
        step["table"]: {
            stage: {"units": figures["units"], "peak_rss_gib": figures["peak_rss_gib"]}
            for stage, figures in step.get("stages", {}).items()
            if isinstance(figures, dict) and "units" in figures
        }
        for step in report["steps"]
    }


# The tasks of a table's step that are not Map children: one each, whatever the batch's size.
COORDINATORS = ("plan", "finish")


def _worker_peak(tables: dict[str, dict[str, Any]], *, coordinators: bool = False) -> float:
    """The largest peak of a unit (a Map child), or with ``coordinators`` of a plan or finish task."""
    peaks = [
        figures["peak_rss_gib"]
        for stages in tables.values()
        for stage, figures in stages.items()
        if (stage in COORDINATORS) == coordinators
    ]
    return max(peaks, default=0.0)


def run_workers_bench(
    *,
    scale: float,
    workers: int,
    root: str | None = None,
    seed: int = 42,
    memory_budget: str,
    progress: Progress,
) -> dict[str, Any]:
    """The distributed path on this machine: one task, then the stages' units as 1 and ``workers``
    processes of their own, then the batch three times over; each worker's peak memory and the speed-up."""
    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="lakehouse-bench-workers-"))
    logs = base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    phases: list[dict[str, Any]] = []
    walls: dict[tuple[int, int], float] = {}
    peaks: dict[tuple[int, int], float] = {}
    coordinator_peaks: dict[int, float] = {}
    for times in (1, 3):
        source = base / f"source-{times}x"
        if source.exists():
            shutil.rmtree(source)
        progress(f"generating scale {times * scale}")
        _measure(
            f"generate {times}x",
            _cli("generate", "--root", str(source), "--scale", str(times * scale), "--seed", str(seed)),
            logs,
        )
        runs: list[int | None] = [None, *sorted({1, workers})] if times == 1 else [workers]
        csv_bytes = {
            table: sum(f.stat().st_size for f in (source / "raw" / table).glob("*.csv")) for table in TABLES
        }
        for count in runs:
            name = f"{times}x, " + ("one task" if count is None else f"{count} worker(s)")
            lake = base / name.replace(", ", "-").replace(" ", "-").replace("(", "").replace(")", "")
            if lake.exists():
                shutil.rmtree(lake)
            _link_raw(source, lake)
            progress(f"{name}: running")
            argv = _cli("run", "--root", str(lake), "--memory-budget", memory_budget)
            phase = _measure(name, argv if count is None else [*argv, "--workers", str(count)], logs)
            report = _latest_report(lake)
            phase["rows"] = _rows_in(report)
            phase["rows_per_s"] = round(phase["rows"] / phase["wall_s"])
            if count is not None:
                tables = _worker_figures(report)
                phase["workers"], phase["tables"] = count, tables
                phase["worker_peak_gib"] = _worker_peak(tables)
                phase["coordinator_peak_gib"] = _worker_peak(tables, coordinators=True)
                units = sum(
                    figures["units"]
                    for stages in tables.values()
                    for stage, figures in stages.items()
                    if stage not in COORDINATORS
                )
                phase["note"] = (
                    f"{units} units, largest peak {phase['worker_peak_gib']:.2f} GiB; plans and finishes "
                    f"{phase['coordinator_peak_gib']:.2f} GiB"
                )
                walls[times, count], peaks[times, count] = phase["wall_s"], phase["worker_peak_gib"]
                coordinator_peaks[times] = phase["coordinator_peak_gib"]
                if times == 1 and count == workers:
                    terabyte = _per_terabyte(report, csv_bytes, memory_budget)
            phases.append(phase)
            shutil.rmtree(lake)
        shutil.rmtree(source)
    return {
        "scale": scale,
        "workers": workers,
        "memory_budget": memory_budget,
        "root": str(base),
        "cpus": os.cpu_count(),
        "phases": phases,
        "speed_up": round(walls[1, 1] / walls[1, workers], 2),
        "worker_peak_3x_vs_1x": round(peaks[3, workers] / peaks[1, workers], 2),
        "coordinator_peak_3x_vs_1x": round(coordinator_peaks[3] / coordinator_peaks[1], 2),
        "per_terabyte": terabyte,
    }


def _per_terabyte(report: dict[str, Any], csv_bytes: dict[str, int], memory_budget: str) -> dict[str, Any]:
    """What a terabyte like this batch costs on the distributed path, modelled from its run
    (``pipeline.costs.per_terabyte``): a first load (no stored rows) in units of the run's own budget."""
    from pipeline.costs import TERABYTE, per_terabyte
    from pipeline.report import StepReport
    from pipeline.stages import parse_size, plan_for

    k = TERABYTE / sum(csv_bytes.values())
    plans = {}
    for table, size in csv_bytes.items():
        plan = plan_for(round(size * k), parse_size(memory_budget))
        plans[table] = (plan.buckets, plan.groups)
    usage = report["cost"]["usage"]
    steps = [StepReport(**step) for step in report["steps"]]
    cost = per_terabyte(
        steps, raw_files=int(usage["raw_files"]), raw_bytes=int(usage["raw_bytes"]), plans=plans
    )
    return {**cost.to_dict(), "plans": plans}


def print_worker_figures(figures: dict[str, Any], console: Console) -> None:
    """The distributed path's figures: each run, each table's units and their largest peak, the ratios."""
    table = Table(
        title=f"distributed path at scale {figures['scale']}, units of {figures['memory_budget']} "
        f"({figures['cpus']} CPUs)"
    )
    for header in ("run", "rows", "wall s", "peak RSS GiB", "rows/s", "note"):
        table.add_column(header, justify="left" if header in ("run", "note") else "right")
    for phase in figures["phases"]:
        table.add_row(
            phase["phase"],
            f"{phase['rows']:,}",
            f"{phase['wall_s']:.2f}",
            f"{phase['peak_rss_gib']:.2f}",
            f"{phase['rows_per_s']:,}",
            phase.get("note", "(the whole run, coordinator and workers)"),
        )
    console.print(table)
    for phase in figures["phases"]:
        for name, stages in phase.get("tables", {}).items():
            shown = ", ".join(
                f"{stage} {value['units']} x peak {value['peak_rss_gib']:.2f} GiB"
                for stage, value in stages.items()
                if value["units"]
            )
            console.print(f"{phase['phase']}, {name}: {shown}", soft_wrap=True)
    from pipeline.costs import cost_line

    terabyte = figures["per_terabyte"]
    units = terabyte["usage"]["child_executions"]
    console.print(
        f"a terabyte of CSV like this batch on the distributed path, modelled from its {figures['workers']}-"
        f"worker run ({units:,} units of {figures['memory_budget']} as Map children): " + cost_line(terabyte),
        soft_wrap=True,
    )
    console.print(
        f"speed-up, {figures['workers']} workers over 1: {figures['speed_up']}x; largest worker peak, "
        f"the batch three times over vs once: {figures['worker_peak_3x_vs_1x']}x (target at most 1.1x), "
        f"of the process that ran the plans and finishes here {figures['coordinator_peak_3x_vs_1x']}x (on "
        f"AWS each is a task of its own); files under {figures['root']}"
    )


HOSTILE = {
    "wide header": "a products file whose header has 200,000 extra columns",
    "header quote": "a 2 MB products file whose header opens a quote that never closes",
    "open quote": "a 2 MB products file whose second line opens a quote that never closes",
}


def _hostile_phases(folder: Path, logs: Path) -> list[dict[str, Any]]:
    """Time and memory of reading hostile files: bounded, whatever the header or the quotes do."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "product_id,department_id,department,product_name"
    rows = "".join(f"{i},1,Dept,Product {i}\n" for i in range(1, 100_001))
    files = {
        "wide header": header + "," + ",".join(f"x{i}" for i in range(200_000)) + "\n" + rows[:2_000_000],
        "header quote": 'product_id,"department_id,department,product_name\n' + rows[:2_000_000],
        "open quote": header + '\n1,1,Dept,"never closed\n' + rows[:2_000_000],
    }
    phases = []
    for kind, text in files.items():
        path = folder / f"{kind.replace(' ', '-')}.csv"
        path.write_text(text)
        phase = _measure(f"hostile: {kind}", _internal("hostile", str(path)), logs)
        phase["note"] = (logs / f"hostile:_{kind.replace(' ', '_')}.log").read_text().strip()
        phases.append(phase)
    return phases


def hostile(path: Path) -> None:
    """Read one file as a products file; print what came of it (rows, malformed, or the file error)."""
    from pipeline.errors import InputFileError
    from pipeline.reader import read_chunks, read_layout
    from pipeline.specs import PRODUCTS

    try:
        layout = read_layout(path, PRODUCTS, path.name)
        assert layout is not None
        rows = malformed = 0
        for chunk in read_chunks(path, PRODUCTS, path.name, layout):
            rows += chunk.records.height
            malformed += chunk.malformed.height
        print(f"{rows:,} rows, {malformed:,} malformed")
    except InputFileError as error:
        print(f"refused: {error}")


def print_figures(figures: dict[str, Any], console: Console) -> None:
    """The figures as a table, with the two ratios the targets are about."""
    table = Table(title=f"benchmark at scale {figures['scale']} ({figures['cpus']} CPUs)")
    for header in ("phase", "rows", "wall s", "CPU s", "peak RSS GiB", "rows/s", "note"):
        table.add_column(header, justify="left" if header in ("phase", "note") else "right")
    for phase in figures["phases"]:
        table.add_row(
            phase["phase"],
            f"{phase['rows']:,}" if phase.get("rows") else "",
            f"{phase['wall_s']:.2f}",
            f"{phase['cpu_s']:.2f}",
            f"{phase['peak_rss_gib']:.2f}",
            f"{phase['rows_per_s']:,}" if phase.get("rows_per_s") else "",
            phase.get("note", ""),
        )
    console.print(table)
    for load, steps in figures["stages"].items():
        for table, step in steps.items():
            stages = ", ".join(
                f"{name} {value['seconds']:.1f} s (peak {value['peak_rss_gib']:.2f} GiB)"
                for name, value in step.items()
                if isinstance(value, dict)
            )
            console.print(f"{load}, {table} ({step['buckets']} buckets, {step['groups']} groups): {stages}")
    worst = max(figures["shapes_vs_floor"].items(), key=lambda item: item[1], default=None)
    if worst:
        console.print(f"slowest input shape: {worst[0]}, {worst[1]}x its floor (target: at most 2x)")
    if "contract_check_s" in figures:
        console.print(
            f"contract check in the full load: {figures['contract_check_s']:.2f} s, "
            f"{figures['contract_check_share']:.1%} of its wall time (target: under 5%)"
        )
    if figures.get("full_load_vs_duckdb"):
        console.print(
            f"full load / DuckDB of the same rules: {figures['full_load_vs_duckdb']}x (target 0.75x)"
        )
    console.print(
        f"re-export / full load: {figures['reexport_vs_full_load']}x (target 1.5x); full load / floor: "
        f"{figures['full_load_vs_floor']}x (target 2x); growth (daily batch at scale "
        f"{figures['scale']} vs {figures['small_scale']}): {figures['growth_ratio']}x; "
        f"files under {figures['root']}"
    )


def floor(root: Path, out: Path) -> None:
    """The hardware floor: a typed Polars read of the raw CSVs and a Parquet write, nothing else."""
    import polars as pl

    from pipeline.validate import polars_type

    out.mkdir(parents=True, exist_ok=True)
    for name, spec in TABLES.items():
        types = {c.name: (pl.String() if c.type == "timestamp" else polars_type(c)) for c in spec.columns}
        files = [
            pl.scan_csv(str(path), schema_overrides=types, ignore_errors=True, truncate_ragged_lines=True)
            for path in sorted((root / "raw" / name).glob("*.csv"))
        ]
        frame = pl.concat(files, how="diagonal_relaxed").with_columns(
            pl.col(c.name).str.to_datetime(strict=False, time_unit="us", time_zone="UTC")
            for c in spec.columns
            if c.type == "timestamp"
        )
        frame.sink_parquet(out / f"{name}.parquet")


def scan(root: Path) -> None:
    """Read every column of every table once (the read speed maintenance is meant to improve)."""
    import polars as pl

    from pipeline import delta
    from pipeline.batch import table_uri
    from pipeline.storage import open_store

    store = open_store(str(root))
    for name in TABLES:
        lazy = delta.scan(table_uri(store, name))
        if lazy is not None:
            # max() decodes every page; null_count() could be answered from Parquet statistics.
            lazy.select(pl.all().max()).collect()


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "floor":
        floor(Path(arguments[0]), Path(arguments[1]))
    elif command == "scan":
        scan(Path(arguments[0]))
    elif command == "hostile":
        hostile(Path(arguments[0]))
    elif command == "duckdb":
        from pipeline.bench_duckdb import load

        print(json.dumps(load(Path(arguments[0]), Path(arguments[1]))))
    elif command == "reshape":
        reshape(Path(arguments[0]), Path(arguments[1]), arguments[2])
    else:
        raise SystemExit(f"unknown benchmark phase {command!r}")
