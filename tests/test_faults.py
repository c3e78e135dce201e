"""The fault catalogue (bench/faults.py) as tests: one test per case, each asserting the case
was handled (RefitError on every rank naming tensor / ranks / reason, before any byte moves,
within the timeout, the group usable afterwards; or, for legitimate input, a bit-exact refit).
The selected cases run once, together (about a minute for all of them on 2 cores), in worlds
of local gloo processes under hard per-case deadlines; a crash or hang fails its case only.

Cases the library does not handle yet are xfail(strict=False) in XFAIL, with what they do
today; remove an entry when its fix lands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import faults  # noqa: E402

# case -> what it does today (not handled yet)
XFAIL: dict[str, str] = {
}


def _params():
    out = []
    for case in faults.cases():
        marks = []
        if case.name in XFAIL:
            marks.append(pytest.mark.xfail(strict=False, reason=XFAIL[case.name]))
        out.append(pytest.param(case.name, id=case.name, marks=marks))
    return out


def _selected(request, test_name: str) -> list[str]:
    return [item.callspec.params["name"] for item in request.session.items
            if getattr(item, "originalname", None) == test_name and hasattr(item, "callspec")]


@pytest.fixture(scope="module")
def catalogue(request):
    """Every selected case, run once: {case name: row}."""
    names = _selected(request, "test_fault_case")
    rows, summary = faults.run_catalogue(names, exact_names=True)
    return {row["case"]: row for row in rows}, summary


def test_catalogue_has_every_kind_of_case():
    cases = faults.cases()
    runnable = [c for c in cases if not c.skip]
    assert len(runnable) >= 60
    assert len({c.name for c in cases}) == len(cases)
    assert sum(c.share == "matrix" for c in cases) >= 22  # tests/test_bad_input.py's matrix
    assert any(c.dying for c in cases) and any(c.resume_after for c in cases)
    assert {c.world for c in runnable} >= {1, 2, 3}


@pytest.mark.parametrize("name", _params())
def test_fault_case(name, catalogue):
    rows, _ = catalogue
    row = rows[name]
    if row["verdict"] == "skipped":
        pytest.skip(row["happened"])
    assert row["verdict"] == "handled", f"{name}: {row['happened']}"


def test_harness_classifies_crash_hang_and_wrong_results():
    rows, summary = faults.run_catalogue(list(faults.SELFTEST), exact_names=True)
    verdicts = {row["case"]: row["verdict"] for row in rows}
    assert verdicts == {"selftest: segfault": "crash",
                        "selftest: after a crash, same world": "handled",
                        "selftest: hang": "hang",
                        "selftest: wrong result": "silent_wrong",
                        "selftest: wrong exception": "failed"}, rows
    assert "SIGSEGV" in rows[0]["happened"]
    assert (summary["crashes"], summary["hangs"], summary["silent_wrong"]) == (1, 1, 1)
