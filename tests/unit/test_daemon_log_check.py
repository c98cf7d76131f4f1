"""The check of the daemons' logs after each test (tests/support/daemon_logs.py): it finds the
errors of `ts_log.log` and `model_log.log`, and it fails a test on one it did not declare."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.support.daemon_logs import Expected, Watcher, model_entries, server_entries

pytest_plugins = ["pytester"]

STAMP = "2026-12-06T07:23:22,180"
SERVER_LOG = f"""\
{STAMP} [INFO ] tsctl.server - Model server started
{STAMP} [WARN ] tsctl.server - worker 9000-m_1.0 died; restarting it
{STAMP} [ERROR] tsctl.server - start-up failed: Model not found at: nothere.mar
{STAMP} [WARN ] asyncio - Task exception was never retrieved
Traceback (most recent call last):
  File "x.py", line 1, in f
KeyError: 'k'
{STAMP} [INFO ] tsctl.server - Model server stopped
"""


def model_line(message: str, worker: str = "W-9000-m_1.0-stdout") -> str:
    return f"{STAMP} [INFO ] {worker} MODEL_LOG - {message}"


MODEL_LOG = "\n".join(
    [
        model_line("loading the model"),
        model_line("Traceback (most recent call last):"),
        model_line('  File "handler.py", line 3, in handle'),
        model_line("Traceback (most recent call last):", worker="W-9001-m_1.0-stdout"),
        model_line("ValueError: boom"),
        model_line(""),
        model_line("During handling of the above exception, another exception occurred:"),
        model_line(""),
        model_line("Traceback (most recent call last):"),
        model_line("RuntimeError: The following operation failed in the TorchScript interpreter."),
        model_line("Traceback of TorchScript, serialized code (most recent call last):"),
        model_line("RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
        model_line("Traceback (most recent call last):"),
        model_line("OSError: second"),
        model_line("RuntimeError: a third, in W-9001", worker="W-9001-m_1.0-stdout"),
    ]
)


def test_server_log_entries_are_error_records_and_tracebacks(tmp_path: Path) -> None:
    entries = server_entries(SERVER_LOG.splitlines(), tmp_path / "ts_log.log")
    assert [e.text.splitlines()[-1] for e in entries] == [
        f"{STAMP} [ERROR] tsctl.server - start-up failed: Model not found at: nothere.mar",
        "KeyError: 'k'",  # a warning with a traceback counts
    ]
    raw = server_entries(["Traceback (most recent call last):", "OSError: x"], tmp_path)
    assert [e.text for e in raw] == ["Traceback (most recent call last):\nOSError: x"]


def test_model_log_entries_are_whole_tracebacks_of_each_worker(tmp_path: Path) -> None:
    entries = model_entries(MODEL_LOG.splitlines(), tmp_path / "model_log.log")
    messages = [[line.split(" - ", 1)[1] for line in e.text.splitlines()] for e in entries]
    assert len(messages) == 3
    # a chained traceback and TorchScript's own go on to the next traceback that is not chained
    assert messages[0][1] == '  File "handler.py", line 3, in handle'
    assert "ValueError: boom" in messages[0]
    assert messages[0][-1] == "RuntimeError: mat1 and mat2 shapes cannot be multiplied"
    assert sorted(messages[1:]) == [
        ["Traceback (most recent call last):", "OSError: second"],
        ["Traceback (most recent call last):", "RuntimeError: a third, in W-9001"],
    ]


def test_the_check_reads_each_error_once_and_fails_on_an_unexpected_one(tmp_path: Path) -> None:
    watcher = Watcher()
    log_dir, pid_file = tmp_path / "logs", tmp_path / "tsctl.pid"
    log_dir.mkdir()
    (log_dir / "ts_log.log").write_text("an error before the daemon was watched: ERROR\n")
    pid_file.touch()
    watcher.watch(log_dir, pid_file)
    watcher.check(Expected())  # what was there before is not read
    with open(log_dir / "ts_log.log", "a") as log:
        log.write(SERVER_LOG)
    with pytest.raises(AssertionError, match=r"Model not found at: nothere\.mar") as caught:
        watcher.check(Expected())
    assert "KeyError: 'k'" in str(caught.value)
    watcher.check(Expected())  # each error fails one check only
    with open(log_dir / "model_log.log", "a") as log:
        log.write(model_line("Traceback (most recent call last):") + "\n")
        log.write(model_line("ValueError: boom from handler") + "\n")
        log.write(model_line("Traceback (most recent call last):"))  # still being written
    expected = Expected()
    expected.add(["ValueError: boom from handler"])
    watcher.check(expected)
    with open(log_dir / "model_log.log", "a") as log:
        log.write("\n" + model_line("OSError: late") + "\n")
    pid_file.unlink()  # the daemon is gone: read to the end, then forgotten
    with pytest.raises(AssertionError, match=r"(?s)unexpected error.*OSError: late"):
        watcher.check(Expected())
    assert watcher.offsets == {}


def test_a_required_pattern_must_match(tmp_path: Path) -> None:
    entry = server_entries([f"{STAMP} [ERROR] tsctl.server - model broken: pip failed"], tmp_path)
    expected = Expected()
    expected.add(["pip failed"])
    expected.add(["never logged"], required=False)
    assert expected.problems(entry) == []
    expected.add(["also never logged"])
    assert expected.problems(entry) == [
        "daemon_errors pattern 'also never logged' matched no error in the daemons' logs"
    ]


def test_the_fixture_fails_a_test_on_a_daemon_error_it_did_not_declare(
    pytester: pytest.Pytester,
) -> None:
    """tests/conftest.py's fixtures, in a pytest run of their own: a test whose daemon logs an
    ERROR fails (at teardown) unless it declares it, and one that passes without logging what
    it declared fails too."""
    pytester.makeini(
        "[pytest]\nmarkers =\n    daemon_errors: expected daemon errors\n"
        "filterwarnings = error\naddopts = --strict-markers\n"
    )
    pytester.makepyfile(
        textwrap.dedent(
            f"""
            import pytest

            from tests.support.daemon import Server


            def log_an_error(tmp_path):
                server = Server(tmp_path)  # watches its logs, as when it serves
                server.log_dir.mkdir()
                (server.log_dir / "ts_log.log").write_text(
                    "{STAMP} [ERROR] tsctl.server - model broken: pip failed\\n"
                )


            def test_undeclared(tmp_path):
                log_an_error(tmp_path)


            @pytest.mark.daemon_errors("model broken: pip failed")
            def test_declared(tmp_path):
                log_an_error(tmp_path)


            @pytest.mark.daemon_errors("model broken: pip failed")
            def test_declared_but_not_logged():
                pass


            @pytest.mark.daemon_errors("model broken: pip failed")
            def test_failed_before_logging():
                raise AssertionError("no daemon")
            """
        )
    )
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1, errors=2)  # a failed test is not told twice
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_undeclared*",
            "*unexpected error in a daemon's log*ts_log.log:",
            "*model broken: pip failed",
            "*ERROR at teardown of test_declared_but_not_logged*",
            "*'model broken: pip failed' matched no error*",
        ]
    )
