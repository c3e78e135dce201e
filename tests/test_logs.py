"""The harness's progress lines (refit_engine.harness.logs): rank 0 prints them in the seed
benchmark's format; a configuration's log file gets the same lines while it is open."""

import re

from refit_engine.harness.logs import LOGGER, configure, log_file

LINE = r"\[refit-bench \d\d:\d\d:\d\d\] "


def test_rank_0_prints_progress_lines_other_ranks_do_not(capsys):
    configure(1).info("not shown")
    assert capsys.readouterr().out == ""
    configure(0).info("shown")
    assert re.fullmatch(LINE + "shown\n", capsys.readouterr().out)


def test_a_log_file_gets_the_lines_while_open(tmp_path, capsys):
    configure(0)
    path = tmp_path / "config.log"
    with log_file(path):
        LOGGER.info("inside")
    LOGGER.info("after")
    assert re.fullmatch(LINE + "inside\n", path.read_text())
    out = capsys.readouterr().out
    assert "inside" in out and "after" in out
    with log_file(None):  # other ranks: no file
        LOGGER.info("no file")
