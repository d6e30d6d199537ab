"""The cost estimate: each service's figure recomputed here by hand from the published prices."""

from __future__ import annotations

import math

import pytest

from pipeline.costs import (
    DEFAULT_TASK,
    PRICES,
    TaskSize,
    cost_line,
    estimate,
    glue_spark_cost,
    local_transitions,
    s3_requests,
)
from pipeline.report import StepReport


def step(table: str, seconds: float, *, added: int = 0, read: int = 0, commits: int = 0) -> StepReport:
    return StepReport(
        table, 1, 10, 10, 0, 0, 0, {}, 1, None, seconds, commits=commits, files_added=added, files_read=read
    )


TWO_BY_EIGHT = TaskSize(vcpu=2.0, memory_gb=8.0)


def priced(steps: list[StepReport], task: TaskSize = TWO_BY_EIGHT, **overrides: object) -> dict[str, float]:
    arguments: dict[str, object] = {
        "raw_files": 3,
        "raw_bytes": 3_000,
        "crawls": 0,
        "transitions": 0,
        "athena_bytes": [],
        "basis": "test",
        **overrides,
    }
    return estimate(steps, task=task, **arguments).by_service  # type: ignore[arg-type]


def test_fargate_bills_each_step_with_its_start_and_at_least_a_minute() -> None:
    # 2 vCPU and 8 GB on arm64 at 0.03238 and 0.00356 per hour; 21 GB of disk, 1 GB above the free 20.
    per_second = (2 * 0.03238 + 8 * 0.00356 + 1 * 0.000111) / 3600
    short, long = step("products", 1.0), step("order_items", 100.0)
    assert priced([short])["fargate"] == pytest.approx(60 * per_second, rel=1e-4)
    assert priced([long])["fargate"] == pytest.approx(130 * per_second, rel=1e-4)  # + 30 s of start
    spot = priced([long], TaskSize(vcpu=2.0, memory_gb=8.0, spot=True))["fargate"]
    assert spot == pytest.approx(130 * per_second * 0.3, rel=1e-4)
    x86 = priced([short], TaskSize(vcpu=2.0, memory_gb=8.0, architecture="x86_64", ephemeral_gb=20))[
        "fargate"
    ]
    assert x86 == pytest.approx(60 * (2 * 0.04048 + 8 * 0.004445) / 3600, rel=1e-4)


def test_glue_python_shell_bills_dpu_seconds_at_least_a_minute() -> None:
    by_service = priced(
        [step("orders", 10.0), step("order_items", 90.0)], TaskSize(runner="glue", glue_dpu=0.0625)
    )
    assert "fargate" not in by_service
    assert by_service["glue"] == pytest.approx((60 + 90) * 0.0625 / 3600 * 0.44, rel=1e-4)


def test_crawls_athena_and_transitions_at_their_minimums_and_rates() -> None:
    by_service = priced([], crawls=2, transitions=40, athena_bytes=[0, 25_000_000])
    assert by_service["crawler"] == pytest.approx(2 * 600 / 3600 * 0.44)  # 0.0733 a crawl
    assert by_service["step_functions"] == pytest.approx(40 * 0.000025)
    assert by_service["athena"] == pytest.approx((10_000_000 + 25_000_000) / 1e12 * 5.0)


def test_s3_requests_follow_the_files_and_commits() -> None:
    steps = [step("orders", 1.0, added=100, read=4, commits=2)]
    puts, gets = s3_requests(steps, raw_files=2, raw_bytes=(64 << 20) + 1)
    base_puts, base_gets = s3_requests([], raw_files=0, raw_bytes=0)
    assert puts - base_puts == 2 + 100 + 2 + 8  # archive copies, data files, commits, log listings
    assert gets - base_gets == 2 * 2 + 2 + 2 * 4 + 8 * 3  # heads, two ranged GETs, footers and data, log
    by_service = priced(steps, raw_files=2, raw_bytes=(64 << 20) + 1)
    assert by_service["s3"] == pytest.approx(puts * 0.005 / 1000 + gets * 0.0004 / 1000)


def test_a_local_run_is_priced_on_the_cdk_app_s_default_task() -> None:
    assert TaskSize("fargate", 1.0, 4.0, 21, "arm64", False, 1.0) == DEFAULT_TASK  # infra tests: the same


def test_the_total_is_the_sum_and_the_line_shows_it_with_the_prices_date() -> None:
    result = estimate(
        [step("orders", 5.0)],
        raw_files=1,
        raw_bytes=10,
        crawls=1,
        transitions=57,
        athena_bytes=[0],
        basis="b",
        task=TWO_BY_EIGHT,
    )
    assert result.usd == pytest.approx(sum(result.by_service.values()), abs=1e-6)
    line = cost_line(result.to_dict())
    assert line.startswith(f"${result.usd:.4f} (crawler $0.0733, fargate ")
    assert line.endswith(f"list prices of {PRICES.as_of})") and "on Fargate arm64, 2 vCPU / 8 GB" in line


def test_the_happy_path_transitions_grow_with_tables_crawls_and_checks() -> None:
    # Exact agreement with an execution's history is checked on the moto server (tests/aws).
    assert local_transitions(3, 1, 3) - local_transitions(3, 0, 3) == 10
    assert local_transitions(3, 0, 4) - local_transitions(3, 0, 3) == 7
    assert local_transitions(4, 0, 3) - local_transitions(3, 0, 3) == 2


def test_glue_spark_costs_its_dpus_minutes_and_a_crawl() -> None:
    assert glue_spark_cost() == pytest.approx(3 * 10 * 120 / 3600 * 0.44 + 600 / 3600 * 0.44)
    assert glue_spark_cost(dpu=2, job_seconds=10, crawl=False) == pytest.approx(3 * 2 * 60 / 3600 * 0.44)


def distributed_step(table: str, **stages: tuple[int, float, int, int]) -> StepReport:
    """A step of the distributed path: per stage (units or tasks, billed seconds, objects, ranges)."""
    result = step(table, 999.0)  # its wall seconds: not what is billed
    result.stages = {
        name: {"units": units, "seconds": 1.0, "billed_seconds": billed, "objects": objects, "reads": ranges}
        for name, (units, billed, objects, ranges) in stages.items()
    }
    return result


def test_a_distributed_step_is_billed_as_its_tasks_and_its_children_s_transitions() -> None:
    per_second = (2 * 0.03238 + 8 * 0.00356 + 1 * 0.000111) / 3600
    spread = distributed_step(
        "order_items",
        plan=(3, 180.0, 0, 0),
        parse=(2, 150.0, 4, 0),
        resolve=(5, 400.0, 5, 20),
        finish=(1, 75.0, 0, 0),
    )
    by_service = priced([spread], transitions=100)
    assert by_service["fargate"] == pytest.approx((180 + 150 + 400 + 75) * per_second, rel=1e-4)
    # Seven units, seven children of two transitions each; the plans and the finish are the parent's.
    assert by_service["step_functions"] == pytest.approx((100 + 7 * 2) * 0.000025)
    puts, gets = s3_requests([spread], raw_files=0, raw_bytes=0)
    plain_puts, plain_gets = s3_requests([step("order_items", 1.0)], raw_files=0, raw_bytes=0)
    # Per task: its objects and 2 PUTs (item, report); the ranges it read and 6 GETs (item, manifest, state).
    assert puts - plain_puts == (4 + 5) + 2 * (3 + 2 + 5 + 1)
    assert gets - plain_gets == 20 + 6 * (3 + 2 + 5 + 1)


def test_the_distributed_path_s_parent_passes_its_stages_in_turn() -> None:
    # Per table 3 plans and a finish of six states each, 5 Maps of units of five; the rest as before.
    assert (
        local_transitions(3, 0, 3, distributed=True) - local_transitions(3, 0, 3) == 3 * (24 + 25) + 1 - 3 * 2
    )
    assert local_transitions(4, 0, 3, distributed=True) - local_transitions(3, 0, 3, distributed=True) == 49


def test_a_terabyte_scales_the_work_the_units_and_the_shuffle_s_ranges() -> None:
    from pipeline.costs import TERABYTE, per_terabyte

    measured = step("order_items", 50.0, added=10, commits=3)
    measured.stages = {
        name: {
            "units": units,
            "seconds": seconds,
            "billed_seconds": 0.0,
            "objects": objects,
            "reads": ranges,
        }
        for name, (units, seconds, objects, ranges) in {
            "plan": (3, 3.0, 0, 2),
            "parse": (2, 10.0, 4, 0),
            "resolve": (2, 20.0, 2, 4),
            "write": (2, 8.0, 0, 2),
            "moves": (0, 0.0, 0, 0),
            "late": (1, 1.0, 1, 2),
            "finish": (1, 2.0, 0, 1),
        }.items()
    }
    measured.stages["write"]["partitions"] = 500  # the batch's days: no more groups than that
    # A gigabyte measured: k = 1,000; the terabyte's plan cuts it in 1,000 buckets and 800 groups, of
    # which only 500 can be: a group is at least one partition.
    result = per_terabyte(
        [measured],
        raw_files=2,
        raw_bytes=TERABYTE // 1000,
        plans={"order_items": (1000, 800)},
        task=TWO_BY_EIGHT,
    )
    per_second = (2 * 0.03238 + 8 * 0.00356 + 1 * 0.000111) / 3600
    billed = (
        3 * (3.0 * 1000 / 3 + 30)  # three plans of 1,000 s each, and their starts
        + 2000 * 60  # 2,000 parse units (files) of 5 s: a minute each
        + 1000 * 60  # 1,000 buckets of 20 s each
        + 500 * 60  # 500 groups of 16 s
        + 1000 * 60  # late: a unit per file with late rejects, 1,000 of 1 s
        + 1 * (2.0 * 1000 + 30)  # one finish, 2,000 s
    )
    assert result.by_service["fargate"] == pytest.approx(billed * per_second, rel=1e-6)
    children = 2000 + 1000 + 500 + 1000
    assert result.usage["child_executions"] == children
    assert result.usage["transitions"] == local_transitions(1, 0, 1, distributed=True)
    # A resolve unit reads a range of every parse object (1,000 times as many), and there are 500 times
    # as many of them; write and late units read those of the resolve units (500 times as many); the
    # plans and the finish read every object once. Every unit also reads its item, manifest and state.
    ranges = 4 * 1000 * 500 + 2 * 500 * 250 + 2 * 500 * 1000 + 2 * 1000 + 1 * 1000
    tasks = 3 + 2000 + 1000 + 500 + 1000 + 1
    raw_gets = 30 + 2 * 2000 + math.ceil(TERABYTE / (64 << 20))  # bookkeeping, HEADs, ranged GETs
    assert result.usage["s3_get_requests"] == raw_gets + 8 * 3 + ranges + 6 * tasks
    # Objects: as many per unit as here; data files and commits grow by k.
    objects = 4 * 1000 + 2 * 500 + 1 * 1000
    assert result.usage["s3_put_requests"] == 15 + 2000 + 10 * 1000 + 3 * 1000 + 8 + objects + 2 * tasks
    assert result.usage["raw_bytes"] == TERABYTE and result.usage["raw_files"] == 2000
