"""What a batch costs on AWS at list prices: an estimate from what its steps measured.

The prices are data, here and nowhere else, with the date they were taken. No polars or deltalake on
this import path (FinishBatch computes the figure on AWS; ``lakehouse run`` as if on Fargate).

What is measured and what is modelled:
- Fargate: each step's measured seconds plus ``TASK_START_SECONDS`` (Fargate bills from the image
  pull to the task's end, per second, at least a minute), times the task's vCPU and GB; a step on the
  distributed path is each of its tasks so billed (plans, units, finish: ``billed_seconds`` per stage);
- Glue Python shell (the other runner): the same seconds, at least a minute, times its DPU;
- Step Functions: the execution's state transitions (counted from its history on AWS; locally, the
  states a batch passes with one poll per wait), and ``CHILD_TRANSITIONS`` per Distributed Map child;
- the crawlers that ran, each at least ``Prices.crawler_minimum_seconds`` of ``CRAWLER_DPU``;
- Athena: each check's scanned bytes (on AWS; locally none), at least 10 MB a query;
- S3 requests, modelled from the batch's files and its commits, and on the distributed path its
  staged objects and the ranges read of them (``s3_requests``);
- Lambda: the batch's four invocations (trigger, archive, catalog, finish), one second each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.report import StepReport
from pipeline.storage import DOWNLOAD_PART  # the size of one ranged GET of a raw file


@dataclass(frozen=True)
class Prices:
    """AWS list prices in USD (us-east-1, on-demand, no free tier)."""

    as_of: str = "2025-06"
    region: str = "us-east-1"
    fargate_arm64_vcpu_hour: float = 0.03238
    fargate_arm64_gb_hour: float = 0.00356
    fargate_x86_64_vcpu_hour: float = 0.04048
    fargate_x86_64_gb_hour: float = 0.004445
    fargate_ephemeral_gb_hour: float = 0.000111  # beyond the 20 GB every task has
    fargate_spot_discount: float = 0.70  # Spot's typical discount; it varies by region and hour
    fargate_minimum_seconds: int = 60
    glue_dpu_hour: float = 0.44  # Python-shell jobs, Spark jobs and crawlers alike
    glue_minimum_seconds: int = 60  # Python shell and Spark (Glue 2.0 and later)
    crawler_minimum_seconds: int = 600
    step_functions_transition: float = 0.000025  # Standard workflows: 0.025 USD per 1,000
    athena_tb_scanned: float = 5.0
    athena_minimum_bytes: int = 10_000_000
    s3_put_class_request: float = 0.000005  # PUT, COPY, POST, LIST: 0.005 USD per 1,000
    s3_get_class_request: float = 0.0000004  # GET, HEAD: 0.0004 USD per 1,000
    lambda_arm64_gb_second: float = 0.0000133334
    lambda_request: float = 0.0000002


PRICES = Prices()


@dataclass(frozen=True)
class TaskSize:
    """Where the steps run: a Fargate task's size, or a Glue Python-shell job's DPU."""

    runner: str = "fargate"
    vcpu: float = 1.0
    memory_gb: float = 4.0
    ephemeral_gb: int = 21
    architecture: str = "arm64"
    spot: bool = False
    glue_dpu: float = 1.0

    def describe(self) -> str:
        if self.runner == "glue":
            return f"Glue Python shell, {self.glue_dpu:g} DPU"
        spot = " Spot" if self.spot else ""
        return f"Fargate{spot} {self.architecture}, {self.vcpu:g} vCPU / {self.memory_gb:g} GB"


# The CDK app's defaults (infra/lakehouse_infra/config.py): what a local run is priced as.
DEFAULT_TASK = TaskSize()
# Assumptions, not prices: kept apart so that a reader sees which figures are guesses.
TASK_START_SECONDS = 30.0  # image pull and interpreter start of a Fargate task, billed
# A Distributed Map child (a STANDARD execution of one task state): its start and its task state.
CHILD_TRANSITIONS = 2
# A distributed unit's own requests besides its staged objects and ranges: the plan PUTs its item, the
# unit PUTs its report; it reads its item, the manifest and the step's state (HEAD and GET each).
UNIT_PUTS, UNIT_GETS = 2, 6
CRAWLER_DPU = 1.0  # a crawl of a few Delta tables; AWS allocates crawlers' DPUs itself
LAMBDA_INVOCATIONS = 4
LAMBDA_GB = 0.256
# Object requests besides raw files and data files, per batch: manifest, lock, reports, catalog note
# (PUT class), and per table open: the log's listing (PUT class) and its commits or checkpoint (GET).
BOOKKEEPING_PUTS, BOOKKEEPING_GETS = 15, 30
TABLE_OPENS_PER_STEP, LOG_GETS_PER_OPEN = 8, 3


@dataclass
class CostEstimate:
    """What a batch cost, by service, in USD."""

    usd: float
    by_service: dict[str, float]
    basis: str
    prices_as_of: str
    usage: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cost_line(cost: Mapping[str, Any]) -> str:
    """One line for a summary or a message (``cost``: a ``CostEstimate.to_dict()``): the total, then
    the services that cost most."""
    parts = sorted(cost["by_service"].items(), key=lambda item: -item[1])
    shown = ", ".join(f"{name} ${usd:.4f}" for name, usd in parts if usd >= 0.00005)
    return f"${cost['usd']:.4f} ({shown}; {cost['basis']}, list prices of {cost['prices_as_of']})"


def billed_task_seconds(seconds: float, prices: Prices = PRICES) -> float:
    """What Fargate bills for a task whose command ran ``seconds``: from the image pull, at least a minute."""
    return max(prices.fargate_minimum_seconds, seconds + TASK_START_SECONDS)


def is_distributed(step: StepReport) -> bool:
    """Whether the step ran on the distributed path (its stages are tasks, with their billed seconds)."""
    return any("billed_seconds" in stage for stage in step.stages.values())


def child_executions(steps: Sequence[StepReport]) -> int:
    """The Distributed Map children of the steps: one per unit (plans and finishes are the parent's)."""
    return sum(
        int(figures["units"])
        for step in steps
        if is_distributed(step)
        for stage, figures in step.stages.items()
        if stage not in ("plan", "finish")
    )


def s3_requests(steps: Sequence[StepReport], raw_files: int, raw_bytes: int) -> tuple[int, int]:
    """The batch's S3 requests as (PUT class, GET class), modelled from its files and commits, and on
    the distributed path from its units, their staged objects and the ranges they read."""
    puts = BOOKKEEPING_PUTS + raw_files  # every raw file is copied to archived/ (its delete is free)
    gets = BOOKKEEPING_GETS + 2 * raw_files + math.ceil(raw_bytes / DOWNLOAD_PART)  # HEADs, ranged GETs
    for step in steps:
        puts += step.files_added + step.commits + TABLE_OPENS_PER_STEP
        gets += 2 * step.files_read + TABLE_OPENS_PER_STEP * LOG_GETS_PER_OPEN  # a footer, then the data
        if is_distributed(step):
            for figures in step.stages.values():
                puts += int(figures["objects"] + UNIT_PUTS * figures["units"])
                gets += int(figures["reads"] + UNIT_GETS * figures["units"])
    return puts, gets


def local_transitions(tables: int, crawls: int, checks: int, *, distributed: bool = False) -> int:
    """The state transitions of a batch that polls each wait once (the state machine's happy path), on
    the single-task path or the distributed one (the parent execution's; its children come on top)."""
    # Single task: Configure, the choice of path, the Map, and per table: choose the runner, run the step.
    # Distributed: Configure, the choice of path, the cursor's start; per table 3 plans and a finish (each:
    # more?, take, choose, command, task, next) and 5 Maps of units (more?, take, choose, Map, next); the end.
    processing = 3 + tables * (4 * 6 + 5 * 5) + 1 if distributed else 3 + 2 * tables
    catalog = 3 + crawls * 10  # ArchiveFiles, PlanCatalog, the Map; per crawl 7 states and one poll
    counting = 1 + 7 * checks  # the Map; per table: start, wait, get, done?, read, empty?, counted
    return processing + catalog + counting + 2  # FinishSucceeded, NotifySuccess


def estimate(
    steps: Sequence[StepReport],
    *,
    raw_files: int,
    raw_bytes: int,
    crawls: int,
    transitions: int,
    athena_bytes: Sequence[int],
    task: TaskSize = DEFAULT_TASK,
    basis: str,
    prices: Prices = PRICES,
) -> CostEstimate:
    """The batch's cost at ``prices`` for ``steps`` as measured, run as ``task``."""
    if task.runner == "glue":
        dpu_seconds = sum(max(prices.glue_minimum_seconds, step.seconds) * task.glue_dpu for step in steps)
        compute = dpu_seconds / 3600 * prices.glue_dpu_hour
        compute_name = "glue"
    else:
        arch = "arm64" if task.architecture == "arm64" else "x86_64"
        per_second = (
            task.vcpu * getattr(prices, f"fargate_{arch}_vcpu_hour")
            + task.memory_gb * getattr(prices, f"fargate_{arch}_gb_hour")
            + max(0, task.ephemeral_gb - 20) * prices.fargate_ephemeral_gb_hour
        ) / 3600
        billed = sum(
            sum(figures["billed_seconds"] for figures in step.stages.values())
            if is_distributed(step)
            else billed_task_seconds(step.seconds, prices)
            for step in steps
        )
        compute = billed * per_second * ((1 - prices.fargate_spot_discount) if task.spot else 1.0)
        compute_name = "fargate"
    puts, gets = s3_requests(steps, raw_files, raw_bytes)
    scanned = sum(max(prices.athena_minimum_bytes, scanned) for scanned in athena_bytes)
    children = child_executions(steps)
    by_service = {
        compute_name: compute,
        "step_functions": (transitions + CHILD_TRANSITIONS * children) * prices.step_functions_transition,
        "crawler": crawls * prices.crawler_minimum_seconds / 3600 * CRAWLER_DPU * prices.glue_dpu_hour,
        "athena": scanned / 1e12 * prices.athena_tb_scanned,
        "s3": puts * prices.s3_put_class_request + gets * prices.s3_get_class_request,
        "lambda": LAMBDA_INVOCATIONS * (LAMBDA_GB * prices.lambda_arm64_gb_second + prices.lambda_request),
    }
    usage = {
        "raw_files": raw_files,
        "raw_bytes": raw_bytes,
        "step_seconds": round(sum(step.seconds for step in steps), 3),
        "transitions": transitions,
        "child_executions": children,
        "crawls": crawls,
        "athena_bytes": scanned,
        "s3_put_requests": puts,
        "s3_get_requests": gets,
    }
    return CostEstimate(
        usd=round(sum(by_service.values()), 8),
        by_service={name: round(usd, 8) for name, usd in by_service.items()},
        basis=f"{basis}, on {task.describe()}",
        prices_as_of=prices.as_of,
        usage=usage,
    )


TERABYTE = 10**12


def per_terabyte(
    steps: Sequence[StepReport],
    *,
    raw_files: int,
    raw_bytes: int,
    plans: Mapping[str, tuple[int, int]],
    task: TaskSize = DEFAULT_TASK,
    prices: Prices = PRICES,
) -> CostEstimate:
    """What a terabyte of CSV like this batch costs on the distributed path: the batch's ``steps`` (as
    they ran on that path, in units of some memory budget) scaled by k = a terabyte over ``raw_bytes``,
    then priced as a batch.

    The model: every stage's seconds grow by k (the work follows the bytes). Parse and late units are
    files, k times as many of this batch's size; resolve and write units are the buckets and groups of
    the terabyte's own plan for the same budget (``plans``: per table, for its bytes times k), but no
    more groups than the batch had partition values (a terabyte like it has the same days); the moves
    stay one unit. A unit is billed as its share of its stage's seconds and writes as many objects as a
    unit did here. A unit of resolve, write or late reads a range of every object of the stage before,
    so its reads grow by that stage's growth times its own; a plan's or finish's reads grow with the
    parse units. The plans and the finish stay four tasks a table. Transitions: the parent's once, two
    per child. No crawl (a first load's two crawls cost 0.15 USD on top). The run's units should be of
    the budget the plans are for: the objects a unit writes and the seconds it takes follow its size.
    """
    k = TERABYTE / raw_bytes
    scaled = [_scaled(step, k, plans[step.table]) for step in steps]
    return estimate(
        scaled,
        raw_files=math.ceil(raw_files * k),
        raw_bytes=TERABYTE,
        crawls=0,
        transitions=local_transitions(len(steps), 0, len(steps), distributed=True),
        athena_bytes=[0] * len(steps),
        task=task,
        basis="a terabyte of CSV like this batch, modelled from its distributed run",
        prices=prices,
    )


# Whose objects each stage reads; and the stages whose every unit reads a range of each of them.
_READS_FROM = {"resolve": "parse", "write": "resolve", "moves": "resolve", "late": "resolve"}
_SHUFFLES = ("resolve", "write", "late")


def _scaled(step: StepReport, k: float, plan: tuple[int, int]) -> StepReport:
    buckets, groups = plan
    growth: dict[str, float] = {}
    units: dict[str, int] = {}
    for name, figures in step.stages.items():
        was = int(figures["units"])
        # A group is at least one partition: no more write units than the batch had partition values.
        write_units = min(groups, int(figures.get("partitions") or groups))
        units[name] = {"resolve": buckets, "write": write_units}.get(name, was)
        if name in ("parse", "late"):
            units[name] = math.ceil(was * k)
        units[name] = units[name] if was else 0
        growth[name] = units[name] / was if was else 0.0
    stages = {}
    for name, figures in step.stages.items():
        seconds = figures["seconds"] * k
        source = growth.get(_READS_FROM.get(name, "parse"), k)
        reads = figures["reads"] * source * (growth[name] if name in _SHUFFLES else 1.0)
        stages[name] = {
            "units": units[name],
            "seconds": seconds,
            "billed_seconds": units[name] * billed_task_seconds(seconds / units[name])
            if units[name]
            else 0.0,
            "objects": figures["objects"] * growth[name],
            "reads": reads,
        }
    return replace(
        step,
        stages=stages,
        seconds=step.seconds * k,
        files_added=math.ceil(step.files_added * k),
        files_read=math.ceil(step.files_read * k),
        commits=math.ceil(step.commits * k),
    )


def local_estimate(steps: Sequence[StepReport], raw_sizes: Sequence[int], checks: int) -> CostEstimate:
    """A local batch priced as if it ran on AWS with the CDK app's defaults, crawling nothing."""
    return estimate(
        steps,
        raw_files=len(raw_sizes),
        raw_bytes=sum(raw_sizes),
        crawls=0,
        transitions=local_transitions(len(steps), 0, checks, distributed=any(map(is_distributed, steps))),
        athena_bytes=[0] * checks,
        basis="estimate for a local run, no crawl",
    )


def repriced(
    steps: Sequence[StepReport], cost: Mapping[str, Any], task: TaskSize, crawls: int
) -> CostEstimate:
    """A finished batch's estimate (``cost``, as its report keeps it) again, run as ``task`` with
    ``crawls`` crawls: its measured step seconds and its usage, at today's ``PRICES``."""
    usage = cost["usage"]
    return estimate(
        steps,
        raw_files=int(usage["raw_files"]),
        raw_bytes=int(usage["raw_bytes"]),
        crawls=crawls,
        transitions=int(usage["transitions"]) + 10 * (crawls - int(usage["crawls"])),
        athena_bytes=[int(usage["athena_bytes"])],
        task=task,
        basis=f"batch repriced with {crawls} crawl(s)",
    )


def glue_spark_cost(
    jobs: int = 3,
    dpu: float = 10.0,
    job_seconds: float = 120.0,
    *,
    crawl: bool = True,
    prices: Prices = PRICES,
) -> float:
    """The original design's batch on Glue Spark: ``jobs`` jobs of ``dpu`` (its default: 10 G.1X workers)
    for ``job_seconds`` each (at least a minute), and the crawl it runs after every batch."""
    spark = jobs * dpu * max(prices.glue_minimum_seconds, job_seconds) / 3600 * prices.glue_dpu_hour
    crawler = prices.crawler_minimum_seconds / 3600 * CRAWLER_DPU * prices.glue_dpu_hour if crawl else 0.0
    return spark + crawler
