"""``mriq review`` through Typer's CliRunner on a real SQLite database."""

from __future__ import annotations

import csv
import getpass
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from scheduler import cli
from scheduler.database import make_engine, make_session_factory, upgrade
from tests.factories import make_image
from tests.scheduler.reviewdata import Pred, add_classify_job, standard_preds

runner = CliRunner()
ENTRY_KEYS = ["item_id", "job_id", "path", "label", "confidence", "top_k", "explanation",
              "status"]


@pytest.fixture
def env(tmp_path: Path, root: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
        ) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    return {"MRIQ_DATA_DIR": str(tmp_path / "state"), "MRIQ_DATABASE_URL": sqlite_url,
            "MRIQ_DATA_ROOTS": str(root)}


@pytest.fixture
def sessions(env: dict[str, str]) -> Iterator[sessionmaker[Session]]:
    upgrade(env["MRIQ_DATABASE_URL"])
    engine = make_engine(env["MRIQ_DATABASE_URL"])
    yield make_session_factory(engine)
    engine.dispose()


def mriq(env: dict[str, str], *args: str) -> Any:
    return runner.invoke(cli.app, list(args), env=env)


def test_help_lists_the_review_commands() -> None:
    result = runner.invoke(cli.app, ["review", "--help"])
    assert result.exit_code == 0
    for command in ("list", "next", "accept", "correct", "flag", "history", "export"):
        assert command in result.stdout


def test_list_next_decide_and_history(env: dict[str, str], sessions: sessionmaker[Session]
                                      ) -> None:
    with sessions() as s:
        job_id, ids = add_classify_job(s, standard_preds())
    listed = mriq(env, "review", "list", "--job", str(job_id), "--json")
    assert listed.exit_code == 0, listed.output
    entries = json.loads(listed.stdout)
    assert [e["item_id"] for e in entries] == [ids[5], ids[2], ids[1], ids[3]]
    assert list(entries[0])[:8] == ENTRY_KEYS
    assert entries[1]["top_k"] == [["Meningioma", 0.4]] and entries[1]["status"] == "pending"
    nxt = json.loads(mriq(env, "review", "next", "--json").stdout)
    assert nxt["item_id"] == ids[5]
    table = mriq(env, "review", "list")
    assert table.exit_code == 0 and "c.png" in table.stdout

    assert mriq(env, "review", "accept", str(ids[5]), "--reviewer", "ann").exit_code == 0
    bad = mriq(env, "review", "correct", str(ids[2]), "Glioma")
    assert bad.exit_code == 2
    assert "valid labels: Glioblastoma, Meningioma, Normal" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = mriq(env, "review", "accept", "999999")
    assert missing.exit_code == 1 and "review item 999999 not found" in missing.stderr
    error_row = mriq(env, "review", "accept", str(ids[4]))
    assert error_row.exit_code == 2 and "error row" in error_row.stderr
    assert mriq(env, "review", "correct", str(ids[5]), "Normal").exit_code == 0
    history = json.loads(mriq(env, "review", "history", str(ids[5]), "--json").stdout)
    assert [(h["decision"], h["reviewer"], h["current"]) for h in history] == [
        ("accepted", "ann", False), ("corrected", getpass.getuser(), True)]
    assert json.loads(mriq(env, "review", "next", "--json").stdout)["item_id"] == ids[2]
    corrected = json.loads(mriq(env, "review", "list", "--status", "corrected", "--json").stdout)
    assert [(e["item_id"], e["reviewed_label"]) for e in corrected] == [(ids[5], "Normal")]
    assert mriq(env, "review", "flag", str(ids[0])).exit_code == 0
    pending = json.loads(mriq(env, "review", "list", "--json").stdout)
    assert ids[0] in [e["item_id"] for e in pending]


def test_empty_queue_and_unmigrated_database(env: dict[str, str]) -> None:
    unmigrated = mriq(env, "review", "list")
    assert unmigrated.exit_code == 1 and "mriq db upgrade" in unmigrated.stderr
    upgrade(env["MRIQ_DATABASE_URL"])
    nothing = mriq(env, "review", "next", "--json")
    assert nothing.exit_code == 0 and json.loads(nothing.stdout) is None


def test_export_writes_a_dataset_and_refuses_foreign_folders(
    env: dict[str, str], sessions: sessionmaker[Session], root: Path, tmp_path: Path
) -> None:
    sources = [make_image(root / "Normal T1" / f"{n}.png", size=16) for n in ("a", "b")]
    with sessions() as s:
        _, ids = add_classify_job(s, [Pred(str(p), "Normal", 0.4, (), 0.9) for p in sources])
    mriq(env, "review", "accept", str(ids[0]), "--reviewer", "ann")
    mriq(env, "review", "correct", str(ids[1]), "Meningioma", "--reviewer", "bob")
    out = tmp_path / "reviewed"
    done = mriq(env, "review", "export", "--out", str(out), "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["per_label"] == {"Meningioma": 1, "Normal": 1}
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["label"], r["reviewer"]) for r in rows] == [
        (f"Normal T1/{ids[0]}-a.png", "Normal", "ann"),
        (f"Meningioma T1/{ids[1]}-b.png", "Meningioma", "bob")]
    assert (out / "Normal T1" / f"{ids[0]}-a.png").resolve() == sources[0].resolve()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    refused = mriq(env, "review", "export", "--out", str(foreign))
    assert refused.exit_code == 2 and "not an earlier review export" in refused.stderr
