"""In CI every test runs: a skip there means something the tests need is missing.

``.ci/run`` sets ``DECOUPLED_REQUIRE_ALL_TESTS=1``; then a test that would skip (no
Fashion-MNIST, no slurmctld, no PostgreSQL, ...) fails instead, with the skip's reason, which
names what is missing. Without the variable, on a developer's machine, it skips as usual and
``pytest -ra`` lists why.
"""

import os

import pytest

REQUIRE_ALL = "DECOUPLED_REQUIRE_ALL_TESTS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE_ALL) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{reason.removeprefix('Skipped: ')} ({REQUIRE_ALL}=1: in CI this test must run, not skip)"
