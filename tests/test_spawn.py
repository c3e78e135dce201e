"""The harness's rank spawner (refit_engine.harness.spawn): values, failures, crashes."""

import os
import signal

from refit_engine.harness.spawn import failure_report, run_ranks


def _rank_value(rank, world, offset):
    return (rank + offset, world, os.environ["RANK"], os.environ.get("REFIT_TEST_ENV"))


def _rank_fails(rank, world):
    if rank == 1:
        raise ValueError("rank 1 refuses")
    return rank


def _rank_dies(rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def test_every_rank_reports_its_value_with_the_environment_set():
    values, failures = run_ranks(_rank_value, 2, 10, env={"REFIT_TEST_ENV": "x"}, timeout=120)
    assert failures == {}
    assert values == {0: (10, 2, "0", "x"), 1: (11, 2, "1", "x")}
    assert "REFIT_TEST_ENV" not in os.environ  # this process's environment is left as it was


def test_a_failing_rank_reports_its_traceback():
    values, failures = run_ranks(_rank_fails, 2, timeout=120)
    assert values == {0: 0} and list(failures) == [1]
    assert "ValueError: rank 1 refuses" in failures[1]
    assert failure_report(failures).startswith("rank 1:\nTraceback")


def test_a_rank_that_dies_is_named_unless_expected_to():
    values, failures = run_ranks(_rank_dies, 2, timeout=120)
    assert "died without reporting: killed by signal 9 (SIGKILL)" in failures[1]
    values, failures = run_ranks(_rank_dies, 2, timeout=120, dying={1})
    assert values == {0: 0} and failures == {}
