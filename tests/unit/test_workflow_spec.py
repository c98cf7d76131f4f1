"""The workflow spec (`models`, `dag`) read into a DAG, and the `.war` format: no processes."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tsctl.archive.workflow import WorkflowSpecArgs, open_workflow, write_workflow
from tsctl.errors import ArchiveError, UnsafeArchive
from tsctl.server.workflow_spec import (
    InvalidWorkflowSpec,
    NodeSettings,
    handler_functions,
    parse_spec,
)

FUNCTIONS = {"pre", "post", "aggregate"}


def spec(text: str, functions: set[str] = FUNCTIONS) -> Any:
    return parse_spec(yaml.safe_load(text), functions, "handler.py")


def refused(text: str, functions: set[str] = FUNCTIONS) -> str:
    with pytest.raises(InvalidWorkflowSpec) as caught:
        spec(text, functions)
    return caught.value.message


def test_global_and_per_model_settings() -> None:
    found = spec(
        """
        models:
          min-workers: 2
          max-workers: 3
          batch-size: 4
          max-batch-delay: 5
          retry-attempts: 6
          timeout-ms: 7
          m1: {url: m1.mar, batch-size: 8, timeout-ms: 9}
          m2: {url: "https://example.com/m2.mar"}
        dag:
          pre: [m1]
          m1: [m2]
          m2: [post]
        """
    )
    nodes = found.dag.nodes
    assert found.settings == NodeSettings(2, 3, 4, 5, 6, 7)
    assert nodes["m1"].settings == NodeSettings(2, 3, 8, 5, 6, 9)
    assert nodes["m2"].url == "https://example.com/m2.mar"
    assert nodes["m2"].settings == found.settings
    # functions: TorchServe's one worker, batches of one, no delay; the global retries/timeout
    assert nodes["pre"].is_function and nodes["pre"].settings == NodeSettings(1, 1, 1, 0, 6, 7)
    assert found.dag.order == ("pre", "m1", "m2", "post")
    assert found.dag.start == "pre" and found.dag.leaves == ("post",)


def test_defaults_are_torchserves() -> None:
    found = spec("models:\n  m1: {url: m1.mar}\ndag:\n  m1: []\n", set())
    assert found.dag.nodes["m1"].settings == NodeSettings(1, 1, 1, 50, 1, 10000)
    assert found.dag_text == "{m1=[]}"


def test_parallel_branches_feed_their_join() -> None:
    found = spec(
        """
        models: {m1: {url: a.mar}, m2: {url: b.mar}}
        dag:
          pre: [m1, m2]
          m1: [aggregate]
          m2: [aggregate]
        """
    )
    dag = found.dag
    assert dag.children["pre"] == ("m1", "m2")
    assert dag.parents["aggregate"] == ("m1", "m2")
    assert dag.order.index("aggregate") == 3
    assert found.dag_text == "{pre=[m1, m2], m1=[aggregate], m2=[aggregate]}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("models: {}\ndag:\n  pre: [ghost]\n", "unknown node ghost"),
        ("models: {}\ndag:\n  pre: [pre]\n", "node pre feeds itself"),
        ("models: {}\ndag:\n  pre: [post]\n  aggregate: [post]\n", "only one start node"),
        ("models: {}\ndag:\n  pre: [post]\n  post: [aggregate]\n  aggregate: [post]\n", "cycle"),
        ("models: {m1: {batch-size: 2}}\ndag:\n  m1: []\n", "model m1 has no url"),
        ("models: {batch-size: 0}\ndag:\n  pre: []\n", "batch-size must be a whole number"),
        ("models: {m1: {url: a, timeout-ms: x}}\ndag:\n  m1: []\n", "m1: timeout-ms"),
        ("models: {}\n", "no `dag` section"),
        ("models: {}\ndag: [pre]\n", "`dag` must be a mapping"),
        ("models: {}\ndag:\n  pre: {a: 1}\n", "must list the nodes it feeds"),
        ("models: {}\ndag:\n  'a b': []\n", "may hold only letters"),
        ("- not a mapping\n", "it must be a mapping"),
    ],
)
def test_bad_specs_name_the_problem(text: str, problem: str) -> None:
    assert problem in refused(text)


def test_without_a_handler_every_node_must_be_a_model() -> None:
    with pytest.raises(InvalidWorkflowSpec, match="has no handler file"):
        parse_spec(yaml.safe_load("dag:\n  pre: []\n"), set(), None)


def test_too_many_nodes() -> None:
    chain = "".join(f"  pre{i}: [pre{i + 1}]\n" for i in range(70))
    functions = {f"pre{i}" for i in range(71)}
    assert "over the limit" in refused(f"dag:\n{chain}", functions)


def test_too_many_targets_are_refused_while_the_dag_is_read() -> None:
    targets = [f"n{i}" for i in range(100_000)]
    loaded = {"dag": {"pre": targets + targets}}
    with pytest.raises(InvalidWorkflowSpec, match="over the limit of 64 nodes"):
        parse_spec(loaded, {"pre", *targets}, "h.py")
    # the same child listed many times is one edge
    found = parse_spec({"dag": {"pre": ["post"] * 10_000}}, FUNCTIONS, "h.py")
    assert found.dag.children["pre"] == ("post",)


def test_handler_functions_are_read_not_run() -> None:
    source = "import os\nos._exit(1)\ndef pre(d, c): pass\nasync def post(d, c): pass\nx = 1\n"
    assert handler_functions(source, "h.py") == {"os", "pre", "post", "x"}


def test_handler_names_bound_as_torchserves_hasattr_finds_them() -> None:
    source = """
import json, os.path as osp, a.b
from functools import partial
from lib import pre as first, post
mid = partial(print)
left, (right, *rest) = 1, (2, 3)
typed: int = 1
declared: int
obj.attr = 1
class Step: pass
if True:
    try:
        from fast import step
    except ImportError:
        step = None
def outer():
    hidden = 1
"""
    assert handler_functions(source, "h.py") == {
        "json", "osp", "a", "partial", "first", "post", "mid", "left", "right", "rest",
        "typed", "Step", "step", "outer",
    }  # fmt: skip
    found = spec("dag:\n  first: [mid]\n", handler_functions(source, "h.py"))
    assert all(n.is_function for n in found.dag.nodes.values())
    star = handler_functions("from lib import *\n", "h.py")
    assert spec("dag:\n  anything: [other]\n", star).dag.order == ("anything", "other")
    with pytest.raises(InvalidWorkflowSpec, match="not valid Python"):
        handler_functions("def (:", "h.py")


def write(tmp_path: Path, name: str = "wf", **kw: Any) -> Path:
    spec_file = tmp_path / "wf.yaml"
    spec_file.write_text("dag:\n  pre: []\n")
    handler = tmp_path / "wf_handler.py"
    handler.write_text("def pre(data, ctx):\n    return data\n")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return write_workflow(WorkflowSpecArgs(name, spec_file, handler, export_path=out, **kw))


def test_war_round_trip(tmp_path: Path) -> None:
    war = write(tmp_path)
    assert war.name == "wf.war"
    with zipfile.ZipFile(war) as zf:
        manifest = json.loads(zf.read("WAR-INF/MANIFEST.json"))
    assert manifest["workflow"] == {
        "workflowName": "wf",
        "specFile": "wf.yaml",
        "handler": "wf_handler.py",
    }
    with open_workflow(war) as opened:
        checked = opened.workflow_manifest.checked("wf.war")
        target = opened.extract(tmp_path / "x")
    assert checked.workflow is not None and checked.workflow.spec_file == "wf.yaml"
    assert sorted(p.name for p in target.iterdir()) == ["WAR-INF", "wf.yaml", "wf_handler.py"]
    with pytest.raises(ArchiveError, match="already exists"):
        write(tmp_path)
    assert write(tmp_path, force=True) == war
    with pytest.raises(ArchiveError, match="invalid workflow name"):
        write(tmp_path, name="-bad")


def test_torchserve_manifest_checks(tmp_path: Path) -> None:
    war = tmp_path / "old.war"
    with zipfile.ZipFile(war, "w") as zf:
        zf.writestr("WAR-INF/MANIFEST.json", json.dumps({"workflow": {"workflowName": "w"}}))
    with open_workflow(war) as opened, pytest.raises(ArchiveError, match="archive version"):
        opened.workflow_manifest.checked("old.war")


def test_unsafe_war_is_refused(tmp_path: Path) -> None:
    war = tmp_path / "evil.war"
    manifest = {"createdOn": "x", "archiverVersion": "1", "workflow": {"workflowName": "w"}}
    with zipfile.ZipFile(war, "w") as zf:
        zf.writestr("../escape.py", "x")
        zf.writestr("WAR-INF/MANIFEST.json", json.dumps(manifest))
    with open_workflow(war) as opened, pytest.raises(UnsafeArchive, match=r"'\.\.'"):
        opened.extract(tmp_path / "out")
    not_zip = tmp_path / "plain.war"
    not_zip.write_text("hello")
    with pytest.raises(ArchiveError, match="not a workflow archive"):
        open_workflow(not_zip)
    with zipfile.ZipFile(tmp_path / "nomanifest.war", "w") as zf:
        zf.writestr("a.txt", "a")
    with pytest.raises(ArchiveError, match=r"missing WAR-INF/MANIFEST\.json"):
        open_workflow(tmp_path / "nomanifest.war")
