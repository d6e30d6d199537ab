"""Entry script of the Glue Python-shell jobs product_etl, orders_etl and order_items_etl (Python 3.9).

Glue passes job arguments as ``--name value`` pairs and adds its own (``--job-bookmark-option``,
``--JOB_ID``, ...); this keeps ours (``--table``, ``--root``, ``--manifest``) and runs the same step
as the Fargate task: ``lakehouse step TABLE --root ROOT --manifest MANIFEST``. The project's wheel
comes in through ``--additional-python-modules``.
"""

from __future__ import annotations

import argparse
import sys

JOB_TABLES = {"product_etl": "products", "orders_etl": "orders", "order_items_etl": "order_items"}


def step_arguments(argv: list[str]) -> list[str]:
    """The `lakehouse` arguments for Glue's ``argv`` (our options, Glue's own ignored)."""
    parser = argparse.ArgumentParser(prog="glue_entry", add_help=False)
    parser.add_argument("--table")
    parser.add_argument("--JOB_NAME", "--job-name", dest="job_name")
    parser.add_argument("--root", required=True)
    parser.add_argument("--manifest", required=True)
    known, _ = parser.parse_known_args(argv)
    table: str | None = known.table or JOB_TABLES.get(known.job_name or "")
    if not table:
        parser.error("pass --table, or run as one of the jobs " + ", ".join(JOB_TABLES))
    return ["step", table, "--root", known.root, "--manifest", known.manifest]


def main(argv: list[str] | None = None) -> None:
    from pipeline.cli import main as lakehouse

    lakehouse(step_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
