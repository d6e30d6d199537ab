"""Mutation check: remove one trust rule at a time and see the tests that keep it fail.

Not part of the test run (it takes minutes): ``python -m tests.mutation_check [word ...]``
(only the mutants whose rule contains a word). Each mutant is
applied to a copy of the working tree (``git ls-files``), imported first through ``PYTHONPATH``, and the
named tests are run against it; a mutant that no test kills is printed as SURVIVED and the exit code is 1.
A control run with no mutation must pass, else the figures mean nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    rule: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "the contract's primary key is unique among the rows committed",
        "pipeline/contract.py",
        "- key.filter(selected).n_unique().cast(pl.Int64)",
        "- (pl.len() if keep is None else selected.sum()).cast(pl.Int64)",
        ("tests/unit/test_contract.py",),
    ),
    Mutant(
        "the contract's columns are not null unless the spec says so",
        "pipeline/contract.py",
        'rules[f"{name} not null"] = value.is_null()',
        'rules[f"{name} not null"] = value.is_null() & False',
        ("tests/unit/test_contract.py",),
    ),
    Mutant(
        "every merge is checked against the contract first",
        "pipeline/batch.py",
        '    contract.check(rows, spec, keep=merge.get("keep"), where="the merge")\n',
        "",
        ("tests/unit/test_contract.py",),
    ),
    Mutant(
        "a gate is crossed by more than its threshold, not by reaching it",
        "pipeline/gates.py",
        "crossed = observed > threshold",
        "crossed = observed >= threshold",
        ("tests/unit/test_gates.py",),
    ),
    Mutant(
        "a share gate is not judged on a step with fewer than min_rows rows in",
        "pipeline/gates.py",
        'if gate.measure == "share" and rows_in < settings.min_rows:',
        'if gate.measure == "share" and rows_in < 0:',
        ("tests/unit/test_gates.py",),
    ),
    Mutant(
        "a per-reason gate counts that reason's rows, not every rejected row",
        "pipeline/gates.py",
        "count = rejected if gate.reason is None else reasons.get(gate.reason, 0)",
        "count = rejected",
        ("tests/unit/test_gates.py",),
    ),
    Mutant(
        "only the batches named in accept_batches are accepted",
        "pipeline/gates.py",
        "return self.accept or batch_id in self.accept_batches",
        "return self.accept or bool(self.accept_batches)",
        ("tests/unit/test_gates.py",),
    ),
    Mutant(
        "every step judges the gates it is given (lakehouse.toml, options), not the defaults",
        "pipeline/batch.py",
        "gate_results = judge(\n            gates,",
        "gate_results = [] or judge(\n            GateSettings(),",
        ("tests/unit/test_gates.py",),
    ),
    Mutant(
        "a report's samples are each reason's first rejected rows by file and line",
        "pipeline/batch.py",
        'pl.struct("source_file", "source_line").sort().head(SAMPLES_PER_REASON)',
        'pl.struct("source_file", "source_line").head(SAMPLES_PER_REASON)',
        ("tests/integration/test_rejected_summary.py",),
    ),
    Mutant(
        "every commit carries the batch that wrote it",
        "pipeline/delta.py",
        "custom_metadata=None if batch_id is None else {BATCH_KEY: batch_id}",
        "custom_metadata=None",
        ("tests/integration/test_cli.py",),
    ),
    Mutant(
        "a crawl only for a table that is new or whose schema changed",
        "pipeline/catalog.py",
        "if known.get(name) != digest",
        "if known.get(name) != digest or True",
        ("tests/aws/test_handlers.py",),
    ),
    Mutant(
        "the lakehouse crawler only when a lakehouse table changed",
        "handlers/catalog_changes.py",
        "if len(rejected) < len(changed) else []",
        "if changed else []",
        ("tests/aws/test_handlers.py",),
    ),
    Mutant(
        "a failed batch makes the next one crawl every table",
        "handlers/finish_batch.py",
        "    forget_catalog(store)  #",
        "    pass  #",
        ("tests/aws/test_handlers.py",),
    ),
    Mutant(
        "a Fargate step is billed with its start, at least a minute",
        "pipeline/costs.py",
        "max(prices.fargate_minimum_seconds, step.seconds + TASK_START_SECONDS)",
        "step.seconds",
        ("tests/unit/test_costs.py", "tests/integration/test_cli.py"),
    ),
    Mutant(
        "an Athena query is billed at least 10 MB",
        "pipeline/costs.py",
        "max(prices.athena_minimum_bytes, scanned)",
        "scanned",
        ("tests/unit/test_costs.py", "tests/aws/test_handlers.py"),
    ),
    Mutant(
        "an append without a MERGE only for rows none of whose keys are stored",
        "pipeline/batch.py",
        "to_merge == (\n",
        "to_merge >= 0 or (\n",
        ("tests/integration/test_batch.py", "tests/integration/test_differential.py"),
    ),
    Mutant(
        "the append is committed only on the version its keys were looked up in",
        "pipeline/delta.py",
        "        if table.version() == none_stored_at:",
        "        if none_stored_at is not None:",
        ("tests/integration/test_merge.py",),
    ),
    Mutant(
        "an append overtaken by another commit is not retried on top of it",
        "pipeline/delta.py",
        "commit_properties=CommitProperties(max_commit_retries=0),\n        )\n"
        "    except CommitFailedError:\n        return False",
        "commit_properties=CommitProperties(max_commit_retries=15),\n        )\n"
        "    except CommitFailedError:\n        return False",
        ("tests/integration/test_merge.py",),
    ),
    Mutant(
        "a row's digest covers every column (an update in the last one is not lost)",
        "pipeline/dedup.py",
        "for index, column in enumerate(columns)])",
        "for index, column in enumerate(columns[:-1])])",
        ("tests/integration/test_unchanged.py",),
    ),
    Mutant(
        "rows stored as they are already are not merged",
        "pipeline/batch.py",
        '    if theirs is None:\n        return pl.Series("unchanged"',
        '    if True:\n        return pl.Series("unchanged"',
        ("tests/integration/test_unchanged.py",),
    ),
    Mutant(
        "dates and timestamps lie in years 0001-9999",
        "pipeline/validate.py",
        'return value.str.contains(pattern) & ~value.str.starts_with("0000")',
        "return value.str.contains(pattern)",
        ("tests/unit/test_validate.py",),
    ),
    Mutant(
        "a row older than the lakehouse's row is stale_row",
        "pipeline/dedup.py",
        "if stored_order is not None and spec.order_by is not None:",
        "if False:",
        ("tests/unit/test_dedup.py", "tests/integration/test_batch.py"),
    ),
    Mutant(
        "the first write of a table conflicts like every later one",
        "pipeline/delta.py",
        'mode="error",',
        'mode="append",',
        ("tests/integration/test_races.py", "tests/integration/test_merge.py"),
    ),
    Mutant(
        "a quote still open at the end of the file is one malformed record",
        "pipeline/records.py",
        "            if state.in_quote:\n                text = reader.kept",
        "            if False:\n                text = reader.kept",
        ("tests/unit/test_records.py", "tests/unit/test_reader.py"),
    ),
    Mutant(
        "an empty line is not a record",
        "pipeline/records.py",
        "empty = starts == ends",
        "empty = starts < 0",
        ("tests/unit/test_reader.py",),
    ),
    Mutant(
        "header names differing only in case are matched",
        "pipeline/reader.py",
        "column = folded.get(name.casefold())",
        "column = None",
        ("tests/unit/test_reader.py",),
    ),
    Mutant(
        "a file changed while it was read is refused",
        "pipeline/reader.py",
        "if expected_digest is not None and stream.digest != expected_digest:",
        "if False:",
        ("tests/unit/test_reader.py", "tests/integration/test_batch.py"),
    ),
    Mutant(
        "a S3 download holds only while the object is the snapshot's (If-Match)",
        "pipeline/storage.py",
        """Bucket=self.bucket, Key=self._key(key), IfMatch=f'"{etag}"', Range=f"bytes={start}-{end}\"""",
        """Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}\"""",
        ("tests/integration/test_s3.py",),
    ),
    Mutant(
        "content loaded by a succeeded batch is skipped",
        "pipeline/manifest.py",
        "entry = replace(entry, loaded_by=loaded_by(store, entry))",
        "pass",
        ("tests/integration/test_batch.py",),
    ),
    Mutant(
        "a lock whose process is gone from this machine is taken over",
        "pipeline/lock.py",
        "if not process_alive(pid) or (",
        "if False and (",
        ("tests/unit/test_lock.py", "tests/integration/test_signals.py"),
    ),
    Mutant(
        "unlock refuses a live holder unless forced",
        "pipeline/lock.py",
        "if not force and stale_reason(fields) is None:",
        "if False:",
        ("tests/unit/test_lock.py", "tests/integration/test_cli.py"),
    ),
    Mutant(
        "every row of a key is in one bucket of the staged step",
        "pipeline/stages.py",
        "key = pl.col(typed(spec.primary_key))",
        'key = pl.col("_order")',
        ("tests/integration/test_differential.py",),
    ),
    Mutant(
        "a key that changes partition is merged with both partitions in the predicate",
        "pipeline/batch.py",
        "        if moves.any():",
        "        if False:",
        ("tests/integration/test_differential.py",),
    ),
    Mutant(
        "a write into partitions that held nothing conflicts with a writer that filled them meanwhile",
        "pipeline/delta.py",
        'mode="overwrite",\n                predicate=_in_list(part, sorted(partitions), alias=""),',
        'mode="append",',
        ("tests/integration/test_merge.py",),
    ),
    Mutant(
        "every staged part of a step's rejected rows is written",
        "pipeline/batch.py",
        "            for path in self.staging.files(self.KIND, 0):",
        "            for path in self.staging.files(self.KIND, 0)[1:]:",
        ("tests/integration/test_differential.py",),
    ),
    Mutant(
        "every file's late rejects get their text (staged by file)",
        "pipeline/batch.py",
        "            late_files = staging.parts(LATE)",
        "            late_files = staging.parts(LATE)[:1]",
        ("tests/integration/test_differential.py",),
    ),
    Mutant(
        "a signal exits with 128 + its number",
        "pipeline/cli.py",
        "sys.exit(128 + stop.signum)",
        "sys.exit(0)",
        ("tests/integration/test_signals.py",),
    ),
)


def _copy_tree(target: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    for name in files:
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _run(tree: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-m", "", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=environment,
        capture_output=True,
        text=True,
    )
    return result.returncode == 0, time.monotonic() - started


def main(argv: list[str]) -> int:
    # Optional words: only the mutants whose rule contains one of them are run.
    mutants = [m for m in MUTANTS if not argv or any(word in m.rule for word in argv)]
    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        tree = Path(scratch)
        _copy_tree(tree)
        probe = subprocess.run(
            [sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not probe.startswith(str(tree)):
            print(f"the copy is not the one imported ({probe}); nothing would be measured")
            return 2
        all_tests = tuple(sorted({test for mutant in mutants for test in mutant.tests}))
        passed, seconds = _run(tree, all_tests)
        print(f"control (no mutation): {'passed' if passed else 'FAILED'} in {seconds:.0f} s")
        if not passed:
            return 2
        survived = 0
        for mutant in mutants:
            path = tree / mutant.path
            original = path.read_text()
            if original.count(mutant.old) != 1:
                print(f"{mutant.rule}: the text to mutate is not found once in {mutant.path}")
                return 2
            path.write_text(original.replace(mutant.old, mutant.new))
            try:
                passed, seconds = _run(tree, mutant.tests)
            finally:
                path.write_text(original)
            survived += passed
            print(f"{'SURVIVED' if passed else 'killed  '} {seconds:5.0f} s  {mutant.rule}")
        print(f"{len(mutants) - survived} of {len(mutants)} mutants killed")
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
