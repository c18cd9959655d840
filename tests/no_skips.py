"""pytest plugin: any skipped test fails the run, so CI cannot go green on tests that did not run
(a fixture file missing in a clean clone used to skip the MiniMind logit comparison silently).
conftest.py imports these hooks; `python -m pytest -p no_skips` loads them anywhere."""
import pytest

skipped = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if skipped:
        terminalreporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; no test may skip: "
                                    + ", ".join(skipped), red=True)
