"""The skip policy of tests/conftest.py, run on pytest sessions of its own (pytester): a skip outside the
allow-list fails the session, an allowed one passes, and an outside-CI allowance fails under CI."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
SKIPPING = "import pytest\n\n\ndef test_ok():\n    pass\n\n\ndef test_skips():\n    pytest.skip('not here')\n"


@pytest.fixture()
def session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("CI", raising=False)  # this suite itself may run under CI
    pytester.makeconftest(CONFTEST)  # the real policy and allow-list
    (pytester.path / "tests").mkdir()
    return pytester


def test_an_unlisted_skip_fails_the_session(session: pytest.Pytester) -> None:
    (session.path / "tests" / "test_new.py").write_text(SKIPPING)
    result = session.runpytest_subprocess("tests/test_new.py")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skips that fail the session*",
                                 "SKIPPED tests/test_new.py::test_skips: not here (not in tests/conftest.py "
                                 "ALLOWED_SKIPS)"])


def test_a_module_skipped_at_import_fails_the_session(session: pytest.Pytester) -> None:
    (session.path / "tests" / "test_optional.py").write_text("import pytest\n\npytest.importorskip('no_such_mod')\n")
    result = session.runpytest_subprocess("tests/test_optional.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED tests/test_optional.py: *no_such_mod* (not in *ALLOWED_SKIPS)"])


def test_an_outside_ci_allowance_passes_outside_ci_and_fails_under_ci(session: pytest.Pytester,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (session.path / "tests" / "test_slurm.py").write_text(SKIPPING)  # matches "tests/test_slurm.py::*"
    result = session.runpytest_subprocess("tests/test_slurm.py")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK
    monkeypatch.setenv("CI", "1")
    result = session.runpytest_subprocess("tests/test_slurm.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED tests/test_slurm.py::test_skips: not here (allowed to skip only outside CI)"])


def test_a_clean_session_and_a_real_failure_keep_their_status(session: pytest.Pytester) -> None:
    (session.path / "tests" / "test_fine.py").write_text("def test_ok():\n    pass\n")
    assert session.runpytest_subprocess("tests/test_fine.py").ret == pytest.ExitCode.OK
    (session.path / "tests" / "test_bad.py").write_text("import pytest\n\n\ndef test_no():\n    assert False\n\n\n"
                                                        "def test_skip():\n    pytest.skip('x')\n")
    assert session.runpytest_subprocess("tests/test_bad.py").ret == pytest.ExitCode.TESTS_FAILED
