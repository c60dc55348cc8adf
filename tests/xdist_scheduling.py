"""How the suite is shared between pytest-xdist workers (`tools/test.sh`: `-n N --dist loadgroup`).

`--dist loadgroup` promises that tests with the same `xdist_group` mark run in one worker.
pytest-xdist 3.8 keeps that promise by appending the group to each test's ID, which pytest 9.2
no longer reads back (pytest-dev/pytest-xdist#1386): the groups are silently ignored and every
test is handed out on its own. This plugin keeps the promise without renaming tests:

* each worker writes, beside the run, which group every grouped test belongs to: its
  `xdist_group` mark, or the module (package) whose module-, class- or package-scoped fixture
  the test uses, so that such a fixture is set up once (the web tests' running node, the site
  learning run, the replay recordings) instead of once per worker;
* the controller hands out a group as one unit and every other test on its own, in the
  workers' collection order, which puts the units holding tests marked ``slow`` first and
  then the groups (their fixtures are the long set-ups), so that no worker is left with a
  long test at the end while the other is idle;
* the workers run numpy with one BLAS thread, as the node does (`OPENBLAS_NUM_THREADS=1`,
  `edge.app.process.tune_process`): two workers on two cores with a BLAS thread per core each
  spent about a quarter more CPU on the same work (`thresholds fit`: 31 s -> 24 s of CPU).
  A plain `pytest` keeps OpenBLAS's default, as before.

Registered by tests/conftest.py when pytest-xdist is installed. A plain `pytest` run (no
`-n`, or `-n 0`) is left as it was; `-n N` without `--dist loadgroup` gets the BLAS setting only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

#: Fixture scopes whose value the tests of a class, module or package share.
SHARED_SCOPES = ("class", "module", "package")
#: workerinput key: the folder where the workers write their groups.
_GROUPS_DIR = "cv_groups_dir"


def _grouping(config: pytest.Config) -> bool:
    return config.getvalue("dist") == "loadgroup" or bool(config.getvalue("loadgroup"))


def _shared_fixture_group(item: pytest.Item) -> str | None:
    """The module or package whose shared fixture `item` uses (the widest), else None."""
    info: Any = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    group: str | None = None
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name)
        if not defs or defs[-1].scope not in SHARED_SCOPES:
            continue
        if defs[-1].scope == "package":
            return str(defs[-1].baseid) or "."
        group = item.nodeid.split("::", 1)[0]
    return group


def _group_of(item: pytest.Item) -> str | None:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    return "_".join(names) or None


class XdistScheduling:
    """The plugin (controller and workers)."""

    def __init__(self) -> None:
        self._groups_dir: Path | None = None

    # -- controller --------------------------------------------------------------------------

    @pytest.hookimpl
    def pytest_configure(self, config: pytest.Config) -> None:
        if hasattr(config, "workerinput") or not config.getvalue("numprocesses"):
            return
        # The workers inherit it: they import numpy, and OpenBLAS reads it, after they start.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        if _grouping(config):
            self._groups_dir = Path(tempfile.mkdtemp(prefix="cv-xdist-groups-"))

    @pytest.hookimpl
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._groups_dir is not None:
            shutil.rmtree(self._groups_dir, ignore_errors=True)

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        if self._groups_dir is not None:
            node.workerinput[_GROUPS_DIR] = str(self._groups_dir)

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if self._groups_dir is None:
            return None
        return GroupScheduling(config, log, self._groups_dir)

    # -- workers -----------------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        workerinput = getattr(config, "workerinput", None)
        if workerinput is None or _GROUPS_DIR not in workerinput:
            return
        for item in items:
            group = _shared_fixture_group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))
        units: dict[str, tuple[bool, bool]] = {}  # unit -> (holds a slow test, is a group)
        for item in items:
            group = _group_of(item)
            slow, grouped = units.get(group or item.nodeid, (False, group is not None))
            units[group or item.nodeid] = (slow or item.get_closest_marker("slow") is not None,
                                           grouped)

        def rank(item: pytest.Item) -> tuple[bool, bool]:
            slow, grouped = units[_group_of(item) or item.nodeid]
            return not slow, not grouped

        # Stable, and the same in every worker (xdist checks that they collected one list); a
        # group's tests stay together, so its module fixture is set up once.
        items.sort(key=rank)

    @pytest.hookimpl(tryfirst=True)  # before pytest-xdist sends the collected IDs
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        workerinput = getattr(session.config, "workerinput", None)
        if workerinput is None or _GROUPS_DIR not in workerinput:
            return
        groups = {item.nodeid: g for item in session.items if (g := _group_of(item))}
        folder = Path(workerinput[_GROUPS_DIR])
        tmp = folder / f".groups-{workerinput['workerid']}.json"
        tmp.write_text(json.dumps(groups))
        tmp.replace(folder / f"groups-{workerinput['workerid']}.json")


class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
    """xdist's scope scheduling, with the workers' groups as scopes (a test of no group is a
    scope of its own), handed out in collection order."""

    def __init__(self, config: pytest.Config, log: Any, groups_dir: Path) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False  # the workers' order is the one wanted
        self._groups_dir = groups_dir
        self._groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:
            # Asked once every worker has reported its collection, and each one wrote its file
            # before reporting; they collected the same tests (xdist checks): any file will do.
            found = sorted(self._groups_dir.glob("groups-*.json"))
            self._groups = json.loads(found[0].read_text()) if found else {}
        return "group:" + self._groups[nodeid] if nodeid in self._groups else nodeid
