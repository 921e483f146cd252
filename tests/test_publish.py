"""benchmarks/publish.py: a suite's leaderboard is published only from complete seeds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_store import cell

from backdoor_toolkit.store import ResultStore
from benchmarks import publish

SUITE = """\
description = "two attacks, one defense, two seeds"
model = "small-cnn"
train_size = 600
seeds = [0, 1]
clean_reference = true
attacks = ["badnets", "blended"]
defenses = ["finetune"]
"""


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *extra: str) -> int:
    argv = ["publish", "--suite", str(tmp_path / "s.toml"), "--db", str(tmp_path / "r.sqlite")]
    argv += ["--out", str(tmp_path / "docs"), "--readme", str(tmp_path / "README.md"), *extra]
    monkeypatch.setattr(sys, "argv", argv)
    return publish.main()


def test_publishes_complete_seeds_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s.toml").write_text(SUITE)
    (tmp_path / "README.md").write_text(f"intro\n{publish.START}\nnot yet\n{publish.END}\nrest\n")
    expected = publish.expected_cells(str(tmp_path / "s.toml"))
    assert sorted(expected) == [0, 1] and all(len(h) == 2 * 3 for h in expected.values())
    names = ["none", "clean-model", "finetune"]
    with ResultStore(tmp_path / "r.sqlite") as store:
        for seed in (0, 1):
            hashes = sorted(expected[seed])
            if seed == 1:
                hashes = hashes[:-1]  # one cell of seed 1 not run yet
            for i, h in enumerate(hashes):
                store.put(cell(names[i % 3], seed, attack=["badnets", "blended"][i // 3], config_hash=h))
    assert _run(monkeypatch, tmp_path, "--status") == 0
    assert "seed 1: 5 of 6 cells stored" in capsys.readouterr().out
    assert _run(monkeypatch, tmp_path) == 1  # one complete seed, two needed
    assert not (tmp_path / "docs").exists() and "not yet" in (tmp_path / "README.md").read_text()
    assert _run(monkeypatch, tmp_path, "--min-seeds", "1") == 0
    md = (tmp_path / "docs" / "s.md").read_text()
    assert "seeds 0;" in md and "bdtk benchmark --suite" in md
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("intro\n") and readme.endswith("rest\n") and "not yet" not in readme
    assert "| 1 | finetune |" in readme and "| — | clean-model |" in readme
    assert "<p>Grown with" in (tmp_path / "docs" / "s.html").read_text()


def test_bad_input_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^No result database at .*nothere\.sqlite"):
        monkeypatch.setattr(sys, "argv", ["publish", "--db", str(tmp_path / "nothere.sqlite")])
        publish.main()
    assert not (tmp_path / "nothere.sqlite").exists()
    (tmp_path / "r.sqlite").write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["publish", "--suite", "nope", "--db", str(tmp_path / "r.sqlite")])
    with pytest.raises(SystemExit, match=r"Unknown suite 'nope'\. Available: .*paper"):
        publish.main()
