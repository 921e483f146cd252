"""Leaderboard views: ranking follows each metric's direction; exports parse; HTML is offline."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from test_store import cell
from typer.testing import CliRunner

from backdoor_toolkit.cli import app
from backdoor_toolkit.errors import BdtkError
from backdoor_toolkit.leaderboard import (
    build_leaderboard,
    export,
    gaps_summary,
    scatter_figure,
    to_csv,
    to_html,
    to_json,
    to_markdown,
    to_rich,
)
from backdoor_toolkit.leaderboard.aggregation import MISSING
from backdoor_toolkit.results import CellResult
from backdoor_toolkit.store import ResultStore

# two seeds; "strong" removes the backdoor at a small BA cost, "weak" barely changes anything
BA_NONE = {0: 0.90, 1: 0.88}
CELLS = {
    "none": {0: (0.90, 0.99, None, 10.0), 1: (0.88, 0.97, None, 11.0)},
    "strong": {0: (0.86, 0.02, 0.965, 4.0), 1: (0.86, 0.04, 0.955, 6.0)},
    "weak": {0: (0.90, 0.90, 0.545, 1.0), 1: (0.87, 0.95, 0.505, 1.0)},
}


def rows(attack: str = "badnets") -> list[CellResult]:
    out = []
    for defense, seeds in CELLS.items():
        for seed, (ba, asr, der, seconds) in seeds.items():
            out.append(
                cell(
                    defense,
                    seed,
                    attack=attack,
                    ba=ba,
                    asr=asr,
                    der=der,
                    seconds=seconds,
                    config_hash=f"{attack}-{defense}-{seed}",
                )
            )
    return out


def test_rank_by_der_and_statistics() -> None:
    board = build_leaderboard(rows())
    per_attack, overall = board.boards
    assert per_attack.attack == "badnets" and overall.attack is None
    ranked = [(e.rank, e.defense) for e in per_attack.entries]
    assert ranked == [(1, "strong"), (2, "weak"), (None, "none")]  # undefended is shown, not ranked
    strong = per_attack.entries[0]
    assert strong.stats["der"].mean == pytest.approx(0.96)
    assert strong.stats["der"].std == pytest.approx(0.00707, abs=1e-4)
    assert strong.stats["ba_drop"].mean == pytest.approx(((0.90 - 0.86) + (0.88 - 0.86)) / 2)
    assert strong.seeds == 2 and strong.failed == 0


def test_ranking_direction_comes_from_the_metric() -> None:
    # lower is better for ASR and time; the weak defense is fastest, so it wins on time
    by_asr = build_leaderboard(rows(), rank_by="asr").boards[0].entries
    assert by_asr[0].defense == "strong"
    by_time = build_leaderboard(rows(), rank_by="seconds").boards[0].entries
    assert by_time[0].defense == "weak"
    with pytest.raises(BdtkError, match="Cannot rank by"):
        build_leaderboard(rows(), rank_by="colour")


def test_failed_cells_are_counted_and_overall_pools_attacks() -> None:
    data = [*rows("badnets"), *rows("blended")]
    data.append(cell("strong", 2, attack="blended", status="failed", error="boom", config_hash="f"))
    board = build_leaderboard(data)
    assert [b.attack for b in board.boards] == ["badnets", "blended", None]
    blended_strong = next(e for e in board.boards[1].entries if e.defense == "strong")
    assert blended_strong.failed == 1 and blended_strong.errors == ["boom"]
    overall_strong = next(e for e in board.boards[2].entries if e.defense == "strong")
    assert overall_strong.seeds == 4 and overall_strong.stats["der"].n == 4


def test_scenarios_with_different_settings_are_kept_apart() -> None:
    other = [
        r.model_copy(update={"setting": {"train_size": 5000}, "config_hash": "x" + r.config_hash})
        for r in rows()
    ]
    board = build_leaderboard([*rows(), *other])
    assert len(board.boards) == 4
    assert len({b.setting for b in board.boards}) == 2


def test_csv_json_markdown_parse() -> None:
    board = build_leaderboard(rows())
    table = list(csv.DictReader(io.StringIO(to_csv(board))))
    assert len(table) == 6  # 3 defenses × (per attack + overall)
    first = table[0]
    assert first["defense"] == "strong" and first["rank"] == "1"
    assert float(first["der_mean"]) == pytest.approx(0.96)
    payload = json.loads(to_json(board))
    assert payload["rank_by"] == "der" and payload["metrics"]["asr"]["higher_is_better"] is False
    assert payload["boards"][0]["entries"][0]["metrics"]["der"]["mean"] == pytest.approx(0.96)
    md = to_markdown(board)
    assert "| 1 | strong | 0.960 ± 0.007 |" in md


def _offline(page: str) -> None:
    """Nothing a browser would fetch: no URLs, no src, and links or url() only to ids in the page."""
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc=|@import", page)
    assert not re.search(r"""href=["'](?!#)|url\((?!#)""", page)


def test_html_is_self_contained() -> None:
    page = to_html(build_leaderboard(rows()))
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</html>" in page
    _offline(page)
    assert page.count("<title>") == 1 + 3  # page title + one tooltip per (attack, defense) point


def test_export_writes_a_real_png(tmp_path: Path) -> None:
    paths = export(build_leaderboard(rows()), tmp_path)
    assert sorted(p.suffix for p in paths) == [".csv", ".html", ".json", ".md", ".png"]
    with Image.open(tmp_path / "leaderboard.png") as image:
        assert image.format == "PNG" and image.width > 600
        assert len(image.convert("RGB").getcolors(1 << 20) or []) > 10  # something was drawn


def test_cli_leaderboard_filters_and_exports(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        for r in [*rows("badnets"), *rows("blended")]:
            store.put(r)
    runner = CliRunner()
    result = runner.invoke(
        app, ["leaderboard", "--db", str(db), "--attack", "blended", "--csv", str(tmp_path / "b.csv")]
    )
    assert result.exit_code == 0, result.output
    exported = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert {r["attack"] for r in exported} == {"blended", "all"}
    empty = runner.invoke(app, ["leaderboard", "--db", str(db), "--dataset", "cifar10"])
    assert empty.exit_code == 2 and "No stored results" in empty.output
    # a filter that matches nothing says what the store holds, so the user can correct it
    said = " ".join(empty.output.split())
    assert "--dataset fashion-mnist" in said and "--attack badnets, blended" in said
    missing = runner.invoke(app, ["leaderboard", "--db", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "No result database" in missing.output
    assert not (tmp_path / "none.sqlite").exists()
    unranked = runner.invoke(app, ["leaderboard", "--db", str(db), "--rank-by", "asr_retuned"])
    assert unranked.exit_code == 2 and "No stored row has asr_retuned" in " ".join(unranked.output.split())


SUFFIX = {"--markdown": ".md", "--csv": ".csv", "--json": ".json", "--html": ".html", "--out": ""}


@pytest.mark.parametrize("option", ["--markdown", "--csv", "--json", "--html", "--out"])
def test_cli_leaderboard_exports_create_no_missing_parents(tmp_path: Path, option: str) -> None:
    """`--csv /nonexistdir/x/a.csv` once created /nonexistdir/x; two missing folders are now one line and
    nothing is written. `--out` may still create its own folder inside an existing one."""
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        for r in rows():
            store.put(r)
    runner = CliRunner()
    result = runner.invoke(
        app, ["leaderboard", "--db", str(db), option, str(tmp_path / "nope" / "x" / f"a{SUFFIX[option]}")]
    )
    assert result.exit_code == 2, result.output
    assert "does not exist; create it first" in " ".join(result.output.split())
    assert not (tmp_path / "nope").exists()
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").touch()
    taken, word = ("a_file", "is a file") if option == "--out" else ("a_folder", "is a folder")
    result = runner.invoke(app, ["leaderboard", "--db", str(db), option, str(tmp_path / taken)])
    assert result.exit_code == 2 and word in result.output
    if option == "--out":
        result = runner.invoke(app, ["leaderboard", "--db", str(db), "--out", str(tmp_path / "new")])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "new" / "leaderboard.csv").is_file()


def by_batch(batch_size: int, attack: str = "badnets") -> list[CellResult]:
    """rows() run with another batch size: a setting that differs in that one field."""
    return [
        r.model_copy(
            update={
                "setting": {**r.setting, "training": {"epochs": 1, "batch_size": batch_size}},
                "config_hash": f"{batch_size}-{r.config_hash}",
            }
        )
        for r in rows(attack)
    ]


def test_settings_that_differ_in_one_field_get_distinct_titles_rows_and_entries() -> None:
    board = build_leaderboard([*by_batch(32), *by_batch(64)])
    titles = [b.title for b in board.boards]
    assert len(set(titles)) == len(titles) == 4
    assert (
        sum("training.batch_size=32" in t for t in titles) == sum("batch_size=64" in t for t in titles) == 2
    )
    table = list(csv.DictReader(io.StringIO(to_csv(board))))
    keys = [(r["setting"], r["attack"], r["defense"]) for r in table]
    assert len(set(keys)) == len(keys) == 12
    assert len({r["setting_hash"] for r in table}) == 2
    payload = json.loads(to_json(board))["boards"]
    assert len({(b["setting"], b["attack"]) for b in payload}) == 4
    assert {b["setting_fields"]["training"]["batch_size"] for b in payload} == {32, 64}
    alone = build_leaderboard(by_batch(32)).boards[0].title  # nothing to tell apart: the short form
    assert "batch_size" not in alone and "train 600" in alone


def test_scatter_has_one_panel_per_setting_with_axes_fitted_to_its_marks() -> None:
    board = build_leaderboard([*by_batch(32), *by_batch(64)])
    figure = scatter_figure(board)
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title(loc="left").replace("\n", " ") for ax in panels] == board.scenarios()
    for ax in panels:
        assert len(ax.lines) == 3  # none, strong, weak: only this setting's marks
        low, high = ax.get_xlim()  # BA spans 86–90 %: fitted, not the whole 0–100
        assert 80 < low < 86 and 90 < high < 95
    page = to_html(board)
    assert page.count("<svg") == 2  # one scatter per scenario


def test_without_matplotlib_png_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        for r in rows():
            store.put(r)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    result = CliRunner().invoke(app, ["leaderboard", "--db", str(db), "--png", str(tmp_path / "s.png")])
    assert result.exit_code == 2
    assert [line for line in result.output.splitlines() if line.strip()] == [
        "Error: --png needs matplotlib: pip install matplotlib (or the plot extra of backdoor-toolkit)."
    ]
    assert not (tmp_path / "s.png").exists()
    paths = export(build_leaderboard(rows()), tmp_path / "out")  # the tables need no matplotlib
    assert sorted(p.suffix for p in paths) == [".csv", ".html", ".json", ".md"]
    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert "<svg" not in page and "pip install" in page


def test_html_sorts_filters_and_shows_code_not_backticks() -> None:
    board = build_leaderboard([*rows("badnets"), *rows("blended")])
    page = to_html(board)
    assert "`" not in page and "<code>none</code>" in page
    headers = len(board.columns()) + 4  # rank, defense, the metrics, seeds, failed
    assert page.count('<th aria-sort="none"><button type="button">') == headers * len(board.boards)
    assert '<td data-value="1">1</td>' in page  # cells carry the numbers they sort by
    assert '<td data-value="">—</td>' in page  # and missing ones sort last
    for value in ("badnets", "blended", "strong", "weak", "none"):
        assert f'<option value="{value}">' in page
    assert '<table class="board" data-attack="blended">' in page and '<tr data-defense="weak">' in page
    assert page.count("<script>") == 1 and "filter-attack" in page and "filter-defense" in page
    _offline(page)


def test_terminal_tables_stay_whole_at_80_columns() -> None:
    names = {"strong": ("mcldef", "paper"), "weak": ("nc-unlearning", None), "none": ("none", None)}
    data = [
        r.model_copy(
            update={
                "defense": names[r.defense][0],
                "defense_preset": names[r.defense][1],
                "asr_retuned": 0.5534,
                "seconds": 1234.5,
            }
        )
        for r in [*rows("badnets"), *rows("input-aware")]
    ]
    board = build_leaderboard(data)
    console = Console(width=80, record=True, file=io.StringIO())
    tables = to_rich(board, width=console.width)
    for table in tables:
        console.print(table)
        assert not any("…" in str(column.header) for column in table.columns)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for whole in ("mcldef:paper", "nc-unlearning", "0.960", "±0.007", "1234.5", "55.3", "ASR rt", "ΔBA"):
        assert whole in text
    wide = Console(width=200, record=True, file=io.StringIO())
    for table in to_rich(board, width=200):
        wide.print(table)
    assert "0.960 ± 0.007" in wide.export_text()  # room enough: one line per row


def test_missing_and_failed_cells_are_listed_with_why() -> None:
    # blended ran seed 0 only, and "strong" failed there: seed 1 of blended is a missing block
    data = [*rows("badnets"), *(r for r in rows("blended") if r.seed == 0 and r.defense != "strong")]
    data.append(
        cell("strong", 0, attack="blended", status="failed", error="out of memory\ntrace", config_hash="f")
    )
    board = build_leaderboard(data)
    gaps = {(g.attack, g.seed, g.defense): g.reason for g in board.gaps}
    assert gaps == {
        ("blended", 0, "strong"): "out of memory",
        ("blended", 1, "none"): MISSING,
        ("blended", 1, "strong"): MISSING,
        ("blended", 1, "weak"): MISSING,
    }
    md = to_markdown(board)
    assert "missing and failed cells" in md
    assert "- blended, seed 0: strong failed: out of memory" in md
    assert f"- blended, seed 1: none, strong, weak: {MISSING}" in md
    assert "<li>blended, seed 1: none, strong, weak" in to_html(board)
    assert {g["status"] for g in json.loads(to_json(board))["gaps"]} == {"failed", "missing"}
    summary = gaps_summary(board)
    assert summary[0].startswith("3 cells missing, 1 failed")
    complete = build_leaderboard(rows("badnets"))
    assert (
        complete.gaps == []
        and gaps_summary(complete) == []
        and "missing and failed" not in to_markdown(complete)
    )
