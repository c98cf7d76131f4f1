"""Workflows end to end: .war archives (tsctl's and TorchServe's), the workflow management API,
`/wfpredict` through a DAG of models and functions, failures and token authorization."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.test_serve import assert_error
from tests.support.daemon import Server
from tests.support.paths import FIXTURES
from tsctl.archive.workflow import WorkflowSpecArgs, open_workflow, write_workflow
from tsctl.archive.writer import ArchiveSpec, plan_archive, write_archive

pytestmark = pytest.mark.slow
WORKFLOWS = FIXTURES / "workflows"
HANDLER = WORKFLOWS / "arith_workflow.py"
TS_ARCHIVER = Path("/tmp/ts-ref/bin/torch-workflow-archiver")


def make_models(store: Path, *names: str) -> None:
    store.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = ArchiveSpec(
            model_name=name,
            handler=str(WORKFLOWS / f"{name}.py"),
            export_path=store,
            force=True,
        )
        write_archive(plan_archive(spec))


def make_war(store: Path, name: str, spec: str, handler: Path | None = HANDLER) -> Path:
    args = WorkflowSpecArgs(name, WORKFLOWS / spec, handler, export_path=store, force=True)
    return write_workflow(args)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("workflows"))
    make_models(srv.store, "adder", "doubler", "combiner", "broken")
    make_war(srv.store, "arith", "arith.yaml")
    make_war(srv.store, "fork", "fork.yaml")
    make_war(srv.store, "failing", "failing.yaml")
    make_war(srv.store, "unknown", "unknown_node.yaml")
    make_war(srv.store, "missing", "missing_model.yaml")
    srv.start()
    yield srv
    srv.stop()


def register(server: Server, url: str, name: str = "", **kw: str) -> tuple[int, object]:
    query = f"url={url}" + (f"&workflow_name={name}" if name else "")
    reply = server.manage("POST", f"/workflows?{query}", headers=kw or None)
    return reply.status, reply.json()


def wfpredict(server: Server, name: str, body: object, **headers: str) -> object:
    data = json.dumps(body)
    return server.request(
        "POST", f"/wfpredict/{name}", data, {"Content-Type": "application/json", **headers}
    )


def test_three_models_and_functions_with_a_parallel_branch(server: Server) -> None:
    status, doc = register(server, "arith.war")
    assert status == 200, doc
    assert doc == {"status": "Workflow arith has been registered and scaled successfully."}
    try:
        reply = wfpredict(server, "arith", {"n": 5}, **{"x-trace": "t-1"})
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"] == "application/json"
        # pre -> {x: 5}; adder 6 and doubler 10 in parallel; combiner gets both by name
        assert reply.json() == {"result": {"sum": 16, "inputs": ["adder", "doubler"]}}
        # the nodes are real models, named as TorchServe names them, with their settings
        models = server.manage("GET", "/models").json()["models"]
        names = {m["modelName"] for m in models}
        assert {"arith__adder", "arith__doubler", "arith__combiner", "arith__pre"} <= names
        doubler = server.manage("GET", "/models/arith__doubler").json()[0]
        assert (doubler["batchSize"], doubler["maxBatchDelay"]) == (2, 10)
        assert len(doubler["workers"]) == 1
        pre = server.manage("GET", "/models/arith__pre").json()[0]
        assert (pre["batchSize"], pre["maxBatchDelay"]) == (1, 0)
        # the doubler saw the client's headers (every node does)
        direct = server.predict("arith__doubler", {"x": 1}, headers={"x-trace": "t-2"})
        assert direct.json() == {"x": 2, "trace": "t-2"}
    finally:
        assert server.manage("DELETE", "/workflows/arith").status == 200


def test_several_last_nodes_answer_an_object_by_node(server: Server) -> None:
    assert register(server, "fork.war", "forked")[0] == 200
    try:
        reply = wfpredict(server, "forked", {"n": 3}, **{"x-trace": "f"})
        assert reply.status == 200, reply.body
        assert reply.json() == {"adder": {"x": 4}, "doubler": {"x": 6, "trace": "f"}}
    finally:
        server.manage("DELETE", "/workflows/forked")


def test_register_list_describe_unregister(server: Server) -> None:
    assert register(server, "fork.war")[0] == 200
    assert register(server, "arith.war", "second")[0] == 200
    try:
        listed = server.manage("GET", "/workflows").json()
        assert listed == {
            "workflows": [
                {"workflowName": "fork", "workflowUrl": "fork.war"},
                {"workflowName": "second", "workflowUrl": "arith.war"},
            ]
        }
        page = server.manage("GET", "/workflows?limit=1").json()
        assert page == {
            "nextPageToken": "1",
            "workflows": [{"workflowName": "fork", "workflowUrl": "fork.war"}],
        }
        described = server.manage("GET", "/workflows/second").json()
        assert described == [
            {
                "workflowName": "second",
                "workflowUrl": "arith.war",
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 4,
                "maxBatchDelay": 10,
                "workflowDag": "{pre=[adder, doubler], adder=[combiner], doubler=[combiner], "
                "combiner=[post]}",
            }
        ]
        again = register(server, "fork.war")
        assert again[0] == 409
        assert again[1]["message"] == "Workflow fork is already registered."  # type: ignore[index]
    finally:
        gone = server.manage("DELETE", "/workflows/fork")
        assert gone.json() == {"status": 'Workflow "fork" unregistered'}
        server.manage("DELETE", "/workflows/second")
    names = {m["modelName"] for m in server.manage("GET", "/models").json()["models"]}
    assert not any(n.startswith(("fork__", "second__")) for n in names)
    assert_error(
        server.manage("GET", "/workflows/fork"),
        404,
        "WorkflowNotFoundException",
        "Workflow not found: fork",
    )
    assert server.manage("DELETE", "/workflows/fork").status == 404
    missing = wfpredict(server, "fork", {"n": 1})
    assert_error(missing, 404, "WorkflowNotFoundException", "Workflow not found: fork")


@pytest.mark.daemon_errors("broken on purpose")
def test_a_failing_node_fails_the_request_naming_it(server: Server) -> None:
    assert register(server, "failing.war")[0] == 200
    try:
        reply = wfpredict(server, "failing", {"n": 1})
        assert reply.status == 500
        doc = reply.json()
        assert doc["type"] == "InternalServerException"
        assert "Error executing broken" in doc["message"]
        assert "after 2 attempts" in doc["message"]  # retry-attempts: 1
    finally:
        server.manage("DELETE", "/workflows/failing")


def test_bad_specs_are_400_naming_the_problem(server: Server, tmp_path: Path) -> None:
    status, doc = register(server, "unknown.war")
    assert status == 400
    assert doc["type"] == "InvalidDAGException"  # type: ignore[index]
    assert "unknown node ghost" in doc["message"]  # type: ignore[index]
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("models: {}\ndag:\n  pre: [post]\n  post: [pre2]\n  pre2: [post]\n")
    war = write_workflow(WorkflowSpecArgs("cyclic", cyclic, HANDLER, export_path=server.store))
    status, doc = register(server, war.name)
    assert status == 400
    assert "a cycle runs through post, pre2" in doc["message"]  # type: ignore[index]
    for url, problem in (
        ("../x.war", "Relative path is not allowed"),
        ("nothing.war", "Workflow not found in workflow store: nothing.war"),
    ):
        status, doc = register(server, url)
        assert status in (400, 404) and problem in doc["message"], doc  # type: ignore[index]
    status, doc = register(server, "adder.mar")
    assert status == 400 and "WAR-INF/MANIFEST.json" in doc["message"]  # type: ignore[index]
    outside = server.store / "outside.war"
    with zipfile.ZipFile(outside, "w") as zf:
        manifest = {"createdOn": "x", "archiverVersion": "0.2.15"}
        workflow = {"workflowName": "outside", "specFile": "../x.yaml"}
        zf.writestr("WAR-INF/MANIFEST.json", json.dumps({**manifest, "workflow": workflow}))
    status, doc = register(server, "outside.war")
    assert status == 400
    assert "spec file '../x.yaml' is outside the workflow archive" in doc["message"]  # type: ignore[index]
    many = tmp_path / "many.yaml"
    many.write_text("dag:\n" + "".join(f"  f{i}: [f{i + 1}]\n" for i in range(64)))
    bound = tmp_path / "many_handler.py"
    bound.write_text("".join(f"f{i} = print\n" for i in range(65)))
    war = write_workflow(WorkflowSpecArgs("many", many, bound, export_path=server.store))
    status, doc = register(server, war.name)
    assert (status, doc["type"]) == (400, "InvalidDAGException")  # type: ignore[index]
    assert "over the limit of 64 nodes" in doc["message"]  # type: ignore[index]
    status, doc = register(server, "missing.war")  # a model that cannot load: rolled back
    assert status == 500
    assert doc["message"] == (  # type: ignore[index]
        "Workflow missing has failed to register. Failures: [Workflow Node lost failed to "
        "register. Details: Model not found at: missing.mar]"
    )
    assert server.manage("GET", "/workflows/missing").status == 404
    reply = server.manage("POST", "/workflows")
    assert_error(reply, 400, "BadRequestException", "Parameter url is required.")
    names = {m["modelName"] for m in server.manage("GET", "/models").json()["models"]}
    assert not any("__" in n for n in names)  # nothing left of the refused ones


def test_tsctl_war_manifest_has_torchserves_shape(tmp_path: Path) -> None:
    war = make_war(tmp_path, "arith", "arith.yaml")
    with zipfile.ZipFile(war) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("WAR-INF/MANIFEST.json"))
    assert names == {"arith.yaml", "arith_workflow.py", "WAR-INF/MANIFEST.json"}
    assert list(manifest) == ["createdOn", "workflow", "archiverVersion"]
    assert manifest["workflow"] == {
        "workflowName": "arith",
        "specFile": "arith.yaml",
        "handler": "arith_workflow.py",
    }
    if TS_ARCHIVER.exists():  # the reference tool's manifest, key for key
        made = tmp_path / "ts"
        made.mkdir()
        run_ts_archiver(made, "arith", WORKFLOWS / "arith.yaml")
        with zipfile.ZipFile(made / "arith.war") as zf:
            theirs = json.loads(zf.read("WAR-INF/MANIFEST.json"))
            assert set(zf.namelist()) == names
        assert list(theirs) == list(manifest)
        assert theirs["workflow"] == manifest["workflow"]


def run_ts_archiver(export: Path, name: str, spec: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    subprocess.run(
        [
            str(TS_ARCHIVER),
            "--workflow-name",
            name,
            "--spec-file",
            str(spec),
            "--handler",
            str(HANDLER),
            "--export-path",
            str(export),
        ],
        check=True,
        env=env,
        cwd=export,
    )


@pytest.mark.skipif(not TS_ARCHIVER.exists(), reason="TorchServe's torch-workflow-archiver absent")
def test_a_war_made_by_torchserves_archiver_is_served(server: Server) -> None:
    run_ts_archiver(server.store, "tsmade", WORKFLOWS / "fork.yaml")
    with open_workflow(server.store / "tsmade.war") as war:
        assert war.workflow_manifest.workflow is not None
        assert war.workflow_manifest.workflow.workflow_name == "tsmade"
    assert register(server, "tsmade.war")[0] == 200
    try:
        reply = wfpredict(server, "tsmade", {"n": 10}, **{"x-trace": "ts"})
        assert reply.json() == {"adder": {"x": 11}, "doubler": {"x": 20, "trace": "ts"}}
    finally:
        server.manage("DELETE", "/workflows/tsmade")


def test_cli_archive_workflow(tmp_path: Path, server: Server) -> None:
    result = server.tsctl(
        "archive",
        "workflow",
        "--workflow-name",
        "climade",
        "--spec-file",
        WORKFLOWS / "fork.yaml",
        "--handler",
        HANDLER,
        "--extra-files",
        WORKFLOWS / "adder.py",
        "--export-path",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "climade.war") as zf:
        assert "adder.py" in zf.namelist()
    again = server.tsctl(
        "archive", "workflow", "--workflow-name", "climade", "--spec-file",
        WORKFLOWS / "fork.yaml", "--export-path", tmp_path,
    )  # fmt: skip
    assert again.returncode != 0 and "already exists" in again.stderr


def test_token_authorization(tmp_path: Path) -> None:
    srv = Server(tmp_path)
    make_models(srv.store, "adder", "doubler")
    make_war(srv.store, "fork", "fork.yaml")
    srv.start(auth=True)
    try:
        keys = json.loads((srv.root / "key_file.json").read_text())

        def bearer(kind: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {keys[kind]['key']}"}

        assert register(srv, "fork.war")[0] == 400
        assert register(srv, "fork.war", **bearer("inference"))[0] == 400
        assert register(srv, "fork.war", **bearer("management"))[0] == 200
        assert srv.manage("GET", "/workflows").status == 400
        assert srv.manage("GET", "/workflows", headers=bearer("management")).status == 200
        body = {"n": 1}
        assert wfpredict(srv, "fork", body).status == 400
        assert wfpredict(srv, "fork", body, **bearer("management")).status == 400
        assert wfpredict(srv, "fork", body, **bearer("inference")).status == 200
        gone = srv.manage("DELETE", "/workflows/fork")
        assert gone.status == 400
        assert srv.manage("DELETE", "/workflows/fork", headers=bearer("management")).status == 200
    finally:
        srv.stop()


def test_workflow_models_stay_out_of_snapshots(tmp_path: Path) -> None:
    srv = Server(tmp_path, properties={"enable_model_api": "true"})
    make_models(srv.store, "adder", "doubler")
    make_war(srv.store, "fork", "fork.yaml")
    srv.start(ncs=False)
    try:
        assert register(srv, "fork.war")[0] == 200
        assert register(srv, "fork.war", "my__wf")[0] == 200  # `__` in a workflow's name
        plain = srv.manage("POST", "/models?url=adder.mar&model_name=plain")
        assert plain.status == 200  # a model change: a snapshot is written
        newest = sorted((srv.log_dir / "config").glob("*-snapshot.cfg"))[-1].read_text()
        assert '"plain"' in newest.replace("\\", "")
        assert "fork__" not in newest  # as in TorchServe: workflows are registered again
        assert "my__wf__" not in newest
    finally:
        srv.stop()


# -- a workflow's models are its own; unregistering; parallel branches --------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the model API on, where users register models beside workflows."""
    props = {"enable_model_api": "true", "max_request_size": 100_000}
    srv = Server(tmp_path_factory.mktemp("wf-guarded"), properties=props)
    make_models(srv.store, "adder", "doubler", "gate")
    (srv.store / "v2").mkdir()
    adder2 = ArchiveSpec(
        model_name="adder",
        handler=str(WORKFLOWS / "adder.py"),
        export_path=srv.store / "v2",
        version="2.0",
    )
    write_archive(plan_archive(adder2))
    make_war(srv.store, "fork", "fork.yaml")
    make_war(srv.store, "parallel", "parallel.yaml", None)
    make_war(srv.store, "gated", "gated.yaml", None)
    srv.start(ncs=False)
    yield srv
    srv.stop()


def model_names(server: Server) -> set[str]:
    return {m["modelName"] for m in server.manage("GET", "/models").json()["models"]}


def test_a_users_model_of_a_nodes_name_is_refused_not_used(guarded: Server) -> None:
    user = guarded.manage("POST", "/models?url=v2/adder.mar&model_name=clash__adder")
    assert user.status == 200, user.body
    try:
        status, doc = register(guarded, "fork.war", "clash")
        assert status == 409, doc
        assert doc["message"] == (  # type: ignore[index]
            "Workflow clash: model clash__adder is already registered"
        )
        assert guarded.manage("GET", "/workflows/clash").status == 404
        versions = guarded.manage("GET", "/models/clash__adder/all").json()
        assert [v["modelVersion"] for v in versions] == ["2.0"]
        assert "clash__doubler" not in model_names(guarded)
    finally:
        assert guarded.manage("DELETE", "/models/clash__adder/2.0").status == 200


def test_a_node_unregistered_by_hand_is_not_replaced_by_a_users_model(guarded: Server) -> None:
    assert register(guarded, "fork.war", "byhand")[0] == 200
    try:
        assert guarded.manage("DELETE", "/models/byhand__adder").status == 200
        # the name stays the workflow's: a user's model of it would be called and deleted
        user = guarded.manage("POST", "/models?url=v2/adder.mar&model_name=byhand__adder")
        assert user.status == 409, user.body
        assert "byhand__adder belongs to a workflow" in user.json()["message"]
        reply = wfpredict(guarded, "byhand", {"n": 1})
        assert reply.status == 500
        message = reply.json()["message"]
        assert "Error executing adder: Model not found: byhand__adder" in message
        assert "after 1 attempt:" in message  # no retry of a model that is gone
    finally:
        assert guarded.manage("DELETE", "/workflows/byhand").status == 200
    assert "byhand__doubler" not in model_names(guarded)
    user = guarded.manage("POST", "/models?url=v2/adder.mar&model_name=byhand__adder")
    assert user.status == 200, user.body  # free once the workflow is gone
    assert guarded.manage("DELETE", "/models/byhand__adder/2.0").status == 200


def test_parallel_branches_run_at_the_same_time(guarded: Server, tmp_path: Path) -> None:
    """Each branch waits for a file the other creates when it starts: one after the other,
    the first would wait until the node's timeout-ms and the request would fail."""
    assert register(guarded, "parallel.war")[0] == 200
    try:
        body = {"dir": str(tmp_path), "waits": {"left": "right.started", "right": "left.started"}}
        reply = wfpredict(guarded, "parallel", body)
        assert reply.status == 200, reply.body
        assert reply.json() == {"left": body, "right": body}
        # outputs over 64 KiB in all are merged in a thread: the same object
        padded = {"dir": str(tmp_path), "pad": {"left": 100_000}}
        reply = wfpredict(guarded, "parallel", padded)
        assert reply.json() == {"left": {**padded, "padding": "x" * 100_000}, "right": padded}
    finally:
        assert guarded.manage("DELETE", "/workflows/parallel").status == 200


def test_unregister_keeps_the_name_until_its_models_are_gone(
    guarded: Server, tmp_path: Path
) -> None:
    """While a request holds the first node, DELETE waits for it; meanwhile the name is not
    free, new requests are 404, and the next node is already unregistered (with the rest)."""
    assert register(guarded, "gated.war", "closing")[0] == 200
    body = {"dir": str(tmp_path), "waits": {"gate": "release"}}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(wfpredict, guarded, "closing", body)
        guarded.wait_for((tmp_path / "gate.started").exists)
        deleting = pool.submit(guarded.manage, "DELETE", "/workflows/closing")

        def listed() -> set[str]:
            doc = guarded.manage("GET", "/workflows").json()
            return {w["workflowName"] for w in doc["workflows"]}

        guarded.wait_for(lambda: "closing" not in listed())
        guarded.wait_for(lambda: "closing__after" not in model_names(guarded))
        assert wfpredict(guarded, "closing", body).status == 404
        status, doc = register(guarded, "gated.war", "closing")
        assert (status, doc) == (409, {  # type: ignore[comparison-overlap]
            "code": 409,
            "type": "ConflictStatusException",
            "message": "Workflow closing is already registered.",
        })  # fmt: skip
        (tmp_path / "release").touch()
        reply = running.result()
        assert reply.status == 500
        assert "Error executing after: Model not found: closing__after" in reply.json()["message"]
        assert deleting.result().status == 200
    assert not {"closing__gate", "closing__after"} & model_names(guarded)
    assert register(guarded, "gated.war", "closing")[0] == 200
    assert guarded.manage("DELETE", "/workflows/closing").status == 200


def test_node_requests_carry_the_clients_request_id(guarded: Server, tmp_path: Path) -> None:
    assert register(guarded, "gated.war", "traced")[0] == 200
    try:
        body = {"dir": str(tmp_path), "echo_id": True}
        reply = wfpredict(guarded, "traced", body, **{"x-request-id": "trace-7"})
        assert reply.status == 200, reply.body
        assert reply.headers["x-request-id"] == "trace-7"
        answer = reply.json()
        assert (answer["id_gate"], answer["id_after"]) == ("trace-7-gate-1", "trace-7-after-1")
    finally:
        assert guarded.manage("DELETE", "/workflows/traced").status == 200


def test_an_oversized_output_between_nodes_is_the_servers_500(
    guarded: Server, tmp_path: Path
) -> None:
    assert register(guarded, "gated.war", "padded")[0] == 200
    try:
        body = {"dir": str(tmp_path), "pad": {"gate": 200_000}}
        reply = wfpredict(guarded, "padded", body)
        assert reply.status == 500, reply.body
        message = reply.json()["message"]
        assert "Error executing after: its input of " in message
        assert "exceeds max_request_size (100000)" in message
    finally:
        assert guarded.manage("DELETE", "/workflows/padded").status == 200


def test_a_client_that_goes_away_takes_its_node_jobs_off_the_queue(
    guarded: Server, tmp_path: Path
) -> None:
    """A holds the first node's one worker; B waits in its queue and hangs up: B's job never
    runs (C, sent after, runs once A is done, and B's node never started)."""
    assert register(guarded, "gated.war", "hangup")[0] == 200
    first, gone, last = (tmp_path / n for n in ("a", "b", "c"))
    for folder in (first, gone, last):
        folder.mkdir()

    def pending() -> int:
        described = guarded.manage("GET", "/models/hangup__gate").json()[0]
        return int(described["jobQueueStatus"]["pendingRequests"])

    try:
        with ThreadPoolExecutor(2) as pool:
            body = {"dir": str(first), "waits": {"gate": "release"}}
            running = pool.submit(wfpredict, guarded, "hangup", body)
            guarded.wait_for((first / "gate.started").exists)
            host, port = guarded.inference.removeprefix("http://").split(":")
            data = json.dumps({"dir": str(gone)}).encode()
            with socket.create_connection((host, int(port))) as client:
                client.sendall(
                    b"POST /wfpredict/hangup HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                    % (len(data), data)
                )
                guarded.wait_for(lambda: pending() == 1)
            # its 499 is logged as its run is cancelled (the cancel settles its node's job)
            guarded.access_line('"POST /wfpredict/hangup HTTP/1.1" 499')
            (first / "release").touch()
            assert running.result().status == 200
        assert wfpredict(guarded, "hangup", {"dir": str(last)}).status == 200
        assert (last / "after.started").exists()
        assert not (gone / "gate.started").exists()
    finally:
        assert guarded.manage("DELETE", "/workflows/hangup").status == 200
