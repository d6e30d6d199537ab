"""The state machine definition: valid ASL for statelint once its placeholders are substituted, and wired
as the batch flow needs (sequential steps, retries only on what a retry can fix, every failure notified)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

DEFINITION = Path(__file__).resolve().parents[2] / "statemachine" / "etl.asl.json"
PLACEHOLDERS = {
    "Runner": "fargate",
    "ClusterArn": "arn:aws:ecs:us-east-1:123456789012:cluster/lakehouse",
    "TaskDefinitionArn": "arn:aws:ecs:us-east-1:123456789012:task-definition/lakehouse-step:1",
    "SubnetA": "subnet-0a",
    "SubnetB": "subnet-0b",
    "SecurityGroup": "sg-0a",
    "ContainerName": "lakehouse",
    "CapacityProvider": "FARGATE",
    "ArchiveFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:ArchiveETLFiles",
    "FinishFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:FinishBatch",
    "CatalogFunctionArn": "arn:aws:lambda:us-east-1:123456789012:function:CatalogChanges",
    "CrawlerName": "ecommerce-lakehouse-crawler",
    "RejectedCrawlerName": "ecommerce-lakehouse-rejected-crawler",
    "GlueDatabase": "ecommerce_dwh",
    "AthenaWorkGroup": "ecommerce-lakehouse",
    "TopicArn": "arn:aws:sns:us-east-1:123456789012:ecommerce-etl-notifications",
    "DistributedThresholdBytes": "53687091200",
    "DistributedMaxConcurrency": "40",
    "UnitMemoryBudget": "2.75GiB",
}


def rendered(**overrides: str) -> str:
    """The definition with every ``${Name}`` substituted, as CloudFormation's DefinitionSubstitutions do."""
    values = {**PLACEHOLDERS, **overrides}
    return re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], DEFINITION.read_text())


def states(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every state, nested ones (Map item processors) included."""
    found = {}
    for name, state in definition["States"].items():
        found[name] = state
        if "ItemProcessor" in state:
            found.update(states(state["ItemProcessor"]))
    return found


def test_every_placeholder_is_known() -> None:
    used = set(re.findall(r"\$\{(\w+)\}", DEFINITION.read_text()))
    assert used == set(PLACEHOLDERS)


@pytest.mark.parametrize("runner", ["fargate", "glue"])
def test_statelint_accepts_the_rendered_definition(tmp_path: Path, runner: str) -> None:
    path = tmp_path / "etl.asl.json"
    path.write_text(rendered(Runner=runner))
    statelint = shutil.which("statelint", path=str(Path(sys.executable).parent)) or shutil.which("statelint")
    assert statelint, "statelint is a test dependency (pip install -e '.[test]')"
    done = subprocess.run([statelint, str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_steps_run_one_at_a_time_in_table_order() -> None:
    definition = json.loads(rendered())
    configure, process = definition["States"]["Configure"], definition["States"]["ProcessTables"]
    assert [step["table"] for step in configure["Parameters"]["steps"]] == [
        "products",
        "orders",
        "order_items",
    ]
    assert [step["glue_job"] for step in configure["Parameters"]["steps"]] == [
        "product_etl",
        "orders_etl",
        "order_items_etl",
    ]
    assert process["MaxConcurrency"] == 1


def test_the_fargate_task_runs_the_step_command() -> None:
    task = states(json.loads(rendered()))["RunFargateTask"]
    assert task["Resource"] == "arn:aws:states:::ecs:runTask.sync"
    command = task["Parameters"]["Overrides"]["ContainerOverrides"][0]["Command.$"]
    assert command == "States.Array('step', $.table, '--root', $.root, '--manifest', $.manifest)"


def test_data_errors_are_not_retried() -> None:
    for name, state in states(json.loads(rendered())).items():
        for retry in state.get("Retry", []):
            assert "States.ALL" not in retry["ErrorEquals"], name
            assert "States.TaskFailed" not in retry["ErrorEquals"], name


def test_every_failure_reaches_the_failure_notification() -> None:
    definition = json.loads(rendered())
    top = definition["States"]
    for name, state in top.items():
        if state["Type"] in ("Task", "Map") and not name.startswith(("Notify", "FinishFailed")):
            catches = state.get("Catch", [])
            assert any("States.ALL" in c["ErrorEquals"] and c["Next"] == "FinishFailed" for c in catches), (
                name
            )
    assert top["FinishFailed"]["Next"] == "NotifyFailure"
    assert top["FinishFailed"]["Catch"][0]["Next"] == "NotifyFailureDirectly"
    assert top["NotifyFailure"]["Next"] == top["NotifyFailureDirectly"]["Next"] == "Failed"
    assert top["Failed"]["Type"] == "Fail"


def test_athena_is_polled_not_run_with_sync() -> None:
    resources = {state.get("Resource") for state in states(json.loads(rendered())).values()}
    assert "arn:aws:states:::aws-sdk:athena:startQueryExecution" in resources
    assert not any(
        str(resource).startswith("arn:aws:states:::athena:startQueryExecution.sync") for resource in resources
    )


def test_crawlers_run_only_as_the_catalog_changes_say() -> None:
    top = json.loads(rendered())["States"]
    assert top["ArchiveFiles"]["Next"] == "PlanCatalog"
    plan, crawl = top["PlanCatalog"], top["Crawl"]
    assert plan["Parameters"]["Payload"]["crawlers"] == {
        "lakehouse": "ecommerce-lakehouse-crawler",
        "rejected": "ecommerce-lakehouse-rejected-crawler",
    }
    assert plan["ResultPath"] == "$.catalog" and plan["Next"] == "Crawl"
    # No crawler to run: the Map has no item and the batch goes straight on to the checks.
    assert crawl["Type"] == "Map" and crawl["ItemsPath"] == "$.catalog.crawlers"
    assert crawl["Next"] == "CheckTables"
    inner = crawl["ItemProcessor"]["States"]
    assert inner["StartCrawler"]["Parameters"] == {"Name.$": "$.name"}
    assert inner["CrawlFailed"]["Type"] == "Fail"


def test_the_distributed_path_runs_the_stages_of_pipeline_distributed_table_after_table() -> None:
    from pipeline.distributed import PLANNED, STAGES

    top = json.loads(rendered())["States"]
    stages = top["Configure"]["Parameters"]["stages"]
    tables = [step["table"] for step in top["Configure"]["Parameters"]["steps"]]
    assert [s["table"] for s in stages] == [t for t in tables for _ in range(len(stages) // len(tables))]
    for table in tables:
        actions = [(s["do"], s["stage"]) for s in stages if s["table"] == table]
        assert [stage for do, stage in actions if do == "run"] == list(STAGES)
        assert actions[-1] == ("finish", "")
        # Each plan comes right before the first stage it plans, and after every stage before that.
        for plan, planned in PLANNED.items():
            at = actions.index(("plan", plan))
            assert actions[at + 1] == ("run", planned[0])
            assert all(("run", stage) in actions[:at] for stage in STAGES[: STAGES.index(planned[0])])
    choose = top["ChoosePath"]
    (rule,) = choose["Choices"]
    assert rule["Next"] == "StartStages" and choose["Default"] == "ProcessTables"
    assert {"Variable": "$.runner", "StringEquals": "fargate"} in rule["And"]
    assert top["MoreStages"]["Default"] == "ArchiveFiles"


def test_the_units_are_distributed_map_children_over_the_plan_prefix() -> None:
    from pipeline.distributed import plan_prefix

    top = json.loads(rendered())["States"]
    units = top["RunUnits"]
    assert units["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    reader = units["ItemReader"]
    assert reader["Resource"] == "arn:aws:states:::s3:listObjectsV2"
    prefix = reader["Parameters"]["Prefix.$"]
    assert prefix.startswith("States.Format('{}" + plan_prefix("{}", "{}", "{}") + "'")
    # No failure tolerated (the default 0): one failed unit fails the Map and so the batch.
    assert not {key for key in units if key.startswith("ToleratedFailure")}
    assert units["MaxConcurrencyPath"] == "$.distributed.max_concurrency"
    # The Map gathers its children's outputs into one state (256 KiB at most): each child's is {}.
    assert "ResultWriter" not in units and units["ResultPath"] is None
    assert "ReaderConfig" not in reader and "Label" not in units
    run_unit = units["ItemProcessor"]["States"]["RunUnit"]
    assert run_unit["OutputPath"] is None
    command = run_unit["Parameters"]["Overrides"]["ContainerOverrides"][0]["Command.$"]
    assert command == "States.Array('stage', 'run', $.item, '--root', $.root)"
    assert units["ItemSelector"]["item.$"] == "States.Format('s3://{}/{}', $.bucket, $$.Map.Item.Value.Key)"


def test_every_fargate_task_runs_the_same_task_definition_alike() -> None:
    found = {
        name: state["Parameters"]
        for name, state in states(json.loads(rendered())).items()
        if state.get("Resource") == "arn:aws:states:::ecs:runTask.sync"
    }
    assert set(found) == {"RunFargateTask", "RunStageTask", "RunUnit"}

    def without_command(parameters: dict[str, Any]) -> dict[str, Any]:
        overrides = parameters["Overrides"]["ContainerOverrides"][0]
        return {**parameters, "Overrides": {"ContainerOverrides": [{"Name": overrides["Name"]}]}}

    shapes = [without_command(parameters) for parameters in found.values()]
    assert all(shape == shapes[0] for shape in shapes)
