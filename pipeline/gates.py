"""Quality gates: how much a table may reject before its step warns or refuses to commit.

As dbt's ``warn_if`` / ``error_if``: each gate is a threshold on the rejected rows of a table, or on
those with one reason, as a share of the table's rows in (``*_percent``) or as a count (``*_count``),
at level ``warn`` or ``fail``; a gate is crossed when the observed value is above its threshold. The
defaults protect a new user: a table fails above 10% rejected and warns above 1% (share gates judge a
step of at least 100 rows in). ``lakehouse.toml``
at the root sets others::

    [gates]
    fail_percent = 10          # every table
    warn_percent = 1
    accept_batches = []        # batches landed whatever their gates say
    min_rows = 100             # share gates judge a table with at least this many rows in

    [gates.reasons.unknown_order_id]   # every table, rows with this reason
    warn_count = 0

    [gates.tables.order_items]
    fail_percent = 5

    [gates.tables.order_items.reasons.unknown_product_id]
    fail_percent = 0.5

A table's setting replaces the setting of every table for the same key. Gates are judged after
validation, before the step commits (``pipeline.batch.run_step``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pipeline.errors import LakehouseError, UsageError
from pipeline.specs import TABLES, TableSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10 (the Glue runtime is 3.9)
    import tomli as tomllib

CONFIG_KEY = "lakehouse.toml"
LIMITS = ("fail_percent", "warn_percent", "fail_count", "warn_count")
DEFAULT_LIMITS: dict[str, float] = {"fail_percent": 10.0, "warn_percent": 1.0}
# A share of a handful of rows says little (the generator's next-day products are 2 renamed rows and
# its 4 deliberately broken ones): below this many rows in, only count gates are judged.
DEFAULT_MIN_ROWS = 100

Level = Literal["warn", "fail"]
Measure = Literal["share", "count"]


class GateFailedError(LakehouseError):
    """A table crossed a ``fail`` gate: its step committed nothing."""


@dataclass(frozen=True)
class Gate:
    """One threshold: on the rejected rows of ``table`` (or those with ``reason``)."""

    reason: str | None
    measure: Measure
    threshold: float
    level: Level

    def describe(self) -> str:
        subject = "rows rejected" if self.reason is None else f"rows rejected for {self.reason}"
        limit = f"{self.threshold:g}%" if self.measure == "share" else f"{self.threshold:g}"
        return f"{self.level} above {limit} {subject}"


@dataclass(frozen=True)
class GateResult:
    """A gate judged on one step: what was observed and the outcome."""

    table: str
    reason: str | None
    measure: Measure
    observed: float
    """A share of the rows in (0..1) or a count."""
    threshold: float
    """As ``observed``: a share (0..1) or a count."""
    level: Level
    outcome: Literal["passed", "warned", "failed", "accepted"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def crossed(self) -> bool:
        return self.outcome != "passed"

    def sentence(self) -> str:
        """One line naming table, reason, the observed value and the threshold."""
        subject = "rows rejected" if self.reason is None else f"rows rejected for {self.reason}"
        if self.measure == "share":
            observed, threshold = f"{self.observed:.2%}", f"{self.threshold:.2%}"
        else:
            observed, threshold = f"{self.observed:,.0f}", f"{self.threshold:,.0f}"
        verdict = {
            "passed": "within",
            "warned": "warning: above",
            "failed": "failed: above",
            "accepted": "accepted although above",
        }[self.outcome]
        return f"{self.table}: {observed} {subject}, {verdict} the {self.level} gate of {threshold}"


@dataclass(frozen=True)
class GateSettings:
    """The gates of every table, from ``lakehouse.toml`` and the command line."""

    every_table: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    every_table_reasons: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tables: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    table_reasons: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    accept_batches: tuple[str, ...] = ()
    min_rows: int = DEFAULT_MIN_ROWS
    """Share gates are judged only on a step with at least this many rows in."""
    accept: bool = False
    """Land whatever the gates say (``lakehouse run --accept-gates``); crossed fail gates are recorded
    as ``accepted``."""

    def with_limits(self, **limits: float | None) -> GateSettings:
        """These settings with every table's limits overridden where given (command-line options)."""
        given = {key: float(value) for key, value in limits.items() if value is not None}
        for key, value in given.items():
            _check_limit(key, value, "the command line")
        return replace(self, every_table={**self.every_table, **given})

    def gates_of(self, table: str) -> list[Gate]:
        """The gates a step of ``table`` is judged by."""
        limits = {**self.every_table, **self.tables.get(table, {})}
        gates = _gates(None, limits)
        reasons = {**self.every_table_reasons}
        for reason, own in self.table_reasons.get(table, {}).items():
            reasons[reason] = {**reasons.get(reason, {}), **own}
        for reason, reason_limits in sorted(reasons.items()):
            gates += _gates(reason, reason_limits)
        return gates

    def accepts(self, batch_id: str) -> bool:
        return self.accept or batch_id in self.accept_batches


def _gates(reason: str | None, limits: Mapping[str, float]) -> list[Gate]:
    gates = []
    for key in LIMITS:
        if key in limits:
            level, measure = key.split("_")
            gates.append(
                Gate(
                    reason=reason,
                    measure="share" if measure == "percent" else "count",
                    threshold=limits[key],
                    level="fail" if level == "fail" else "warn",
                )
            )
    return gates


def judge(
    settings: GateSettings,
    table: str,
    batch_id: str,
    rows_in: int,
    rejected: int,
    reasons: Mapping[str, int],
) -> list[GateResult]:
    """Every gate of ``table`` judged on a step's counts; raise ``GateFailedError`` when a ``fail`` gate is
    crossed and the batch is not accepted (the results are on the error)."""
    results = []
    for gate in settings.gates_of(table):
        count = rejected if gate.reason is None else reasons.get(gate.reason, 0)
        if gate.measure == "share" and rows_in < settings.min_rows:
            continue
        if gate.measure == "share":
            observed, threshold = (count / rows_in if rows_in else 0.0), gate.threshold / 100
        else:
            observed, threshold = float(count), gate.threshold
        crossed = observed > threshold
        if not crossed:
            outcome = "passed"
        elif gate.level == "warn":
            outcome = "warned"
        else:
            outcome = "accepted" if settings.accepts(batch_id) else "failed"
        results.append(
            GateResult(table, gate.reason, gate.measure, observed, threshold, gate.level, outcome)  # type: ignore[arg-type]
        )
    failed = [result for result in results if result.outcome == "failed"]
    if failed:
        error = GateFailedError(
            "; ".join(result.sentence() for result in failed)
            + f"; nothing of {table} was committed and its files stay in raw/: fix the export and run "
            f"again, or land it anyway with `lakehouse run --accept-gates` (or add {batch_id!r} to "
            f"accept_batches in {CONFIG_KEY})"
        )
        error.results = results  # type: ignore[attr-defined]
        raise error
    return results


def known_reasons(spec: TableSpec) -> set[str]:
    """Every reason a row of ``spec`` can be rejected with (``pipeline.validate``, ``pipeline.dedup``)."""
    reasons = {"malformed_row", "duplicate_row", "duplicate_key"}
    for column in spec.columns:
        reasons |= {f"missing_column:{column.name}", f"invalid:{column.name}"}
        if not column.nullable:
            reasons.add(f"null:{column.name}")
        if column.has_range_rule:
            reasons.add(f"range:{column.name}")
    if spec.date_of:
        reasons.add("date_mismatch")
    if spec.order_by:
        reasons.add("stale_row")
    reasons |= {fk.reason for fk in spec.foreign_keys}
    return reasons


def parse_settings(text: str, where: str) -> GateSettings:
    """``GateSettings`` from the text of a ``lakehouse.toml``; any unknown key or bad value is an error."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{where} is not valid TOML: {error}") from None
    unknown = set(document) - {"gates"}
    if unknown:
        raise UsageError(
            f"{where}: unknown section(s) {', '.join(sorted(unknown))}; the one section is [gates]"
        )
    gates = document.get("gates", {})
    _only(gates, {*LIMITS, "accept_batches", "min_rows", "reasons", "tables"}, f"{where} [gates]")
    min_rows = gates.get("min_rows", DEFAULT_MIN_ROWS)
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 0:
        raise UsageError(f"{where} [gates] min_rows must be a whole number, 0 or more, not {min_rows!r}")
    accept = gates.get("accept_batches", [])
    if not isinstance(accept, list) or not all(isinstance(batch, str) for batch in accept):
        raise UsageError(f"{where} [gates] accept_batches must be a list of batch ids")
    all_reasons = set().union(*(known_reasons(spec) for spec in TABLES.values()))
    every_table_reasons = {
        reason: _limits(limits, f"{where} [gates.reasons.{reason}]")
        for reason, limits in _reasons(
            gates.get("reasons", {}), all_reasons, f"{where} [gates.reasons]"
        ).items()
    }
    tables: dict[str, dict[str, float]] = {}
    table_reasons: dict[str, dict[str, dict[str, float]]] = {}
    table_sections = gates.get("tables", {})
    _only(table_sections, set(TABLES), f"{where} [gates.tables]")
    for table, section in table_sections.items():
        label = f"{where} [gates.tables.{table}]"
        _only(section, {*LIMITS, "reasons"}, label)
        tables[table] = _limits({key: value for key, value in section.items() if key != "reasons"}, label)
        table_reasons[table] = {
            reason: _limits(limits, f"{label[:-1]}.reasons.{reason}]")
            for reason, limits in _reasons(
                section.get("reasons", {}), known_reasons(TABLES[table]), f"{label[:-1]}.reasons]"
            ).items()
        }
    return GateSettings(
        every_table={**DEFAULT_LIMITS, **_limits({k: v for k, v in gates.items() if k in LIMITS}, where)},
        every_table_reasons=every_table_reasons,
        tables=tables,
        table_reasons=table_reasons,
        accept_batches=tuple(accept),
        min_rows=min_rows,
    )


def _only(section: Any, allowed: set[str], label: str) -> None:
    if not isinstance(section, dict):
        raise UsageError(f"{label} must be a table of settings")
    unknown = set(section) - allowed
    if unknown:
        raise UsageError(
            f"{label}: unknown key(s) {', '.join(sorted(unknown))}; the keys are {', '.join(sorted(allowed))}"
        )


def _reasons(section: Any, allowed: set[str], label: str) -> dict[str, Any]:
    _only(section, allowed, label)
    return dict(section)


def _limits(section: Any, label: str) -> dict[str, float]:
    _only(section, set(LIMITS), label)
    limits = {}
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label}: {key} must be a number, not {value!r}")
        _check_limit(key, float(value), label)
        limits[key] = float(value)
    return limits


def _check_limit(key: str, value: float, label: str) -> None:
    if value < 0 or (key.endswith("_percent") and value > 100):
        bounds = "0 to 100" if key.endswith("_percent") else "0 or more"
        raise UsageError(f"{label}: {key} must be {bounds}, not {value:g}")


def load_settings(store: Any) -> GateSettings:
    """The gate settings of ``store``'s ``lakehouse.toml``, or the defaults when it has none."""
    if store.stat(CONFIG_KEY) is None:
        return GateSettings()
    return parse_settings(store.read_bytes(CONFIG_KEY).decode("utf-8"), store.uri(CONFIG_KEY))
