"""Benchmark grids: expansion, a shared backdoored model, the store, resume, failures, suites."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from backdoor_toolkit import (
    DefenseData,
    ImageClassifier,
    PluginMeta,
    PurificationResult,
    Purifier,
    StrictConfig,
    hookimpl,
)
from backdoor_toolkit import cells as bench
from backdoor_toolkit.benchmark import run_benchmark
from backdoor_toolkit.cells import plan_grid
from backdoor_toolkit.cli import app
from backdoor_toolkit.cli.benchmark import results_notes, results_table
from backdoor_toolkit.config import BenchmarkConfig
from backdoor_toolkit.errors import BdtkError, ConfigError, UnknownNameError
from backdoor_toolkit.plugins import register_plugin, unregister_plugin
from backdoor_toolkit.results import CellResult, Provenance
from backdoor_toolkit.store import ResultStore
from backdoor_toolkit.suites import available_suites, load_suite

# Tiny on purpose: a 600-image subset, one epoch; the numbers are not the point, the bookkeeping is.
TINY: dict[str, Any] = {
    "model": "small-cnn",
    "train_size": 600,
    "test_size": 200,
    "training": {"epochs": 1},
    "device": "cpu",
}
FINETUNE = {"name": "finetune", "config": {"epochs": 1}}


def tiny(**values: Any) -> BenchmarkConfig:
    return BenchmarkConfig.model_validate({**TINY, **values})


class ExplodeConfig(StrictConfig):
    pass


class Explode(Purifier):
    """A defense that always crashes, to check the grid records it and carries on."""

    name = "explode"
    Config = ExplodeConfig
    meta = PluginMeta(summary="Always raises", paper="none", threat_model="none")

    def purify(self, model: ImageClassifier, data: DefenseData) -> PurificationResult:
        raise RuntimeError("kaboom")


class _ExplodePlugin:
    @hookimpl
    def register_purifiers(self, register: Any) -> None:
        register(Explode)


@pytest.fixture
def explode() -> Iterator[str]:
    register_plugin(_ExplodePlugin(), "test-explode")
    yield Explode.name
    unregister_plugin("test-explode")


def test_grid_expands_every_axis_with_distinct_hashes() -> None:
    values = {k: v for k, v in TINY.items() if k != "model"}
    cfg = BenchmarkConfig.model_validate(
        {
            **values,
            "models": ["small-cnn", "wrn-16-1"],
            "datasets": ["fashion-mnist", "mnist"],
            "attacks": ["badnets", "blended"],
            "defenses": ["finetune", "fine-pruning"],
            "seeds": [0, 1, 2],
        }
    )
    plans = plan_grid(cfg)
    assert len(plans) == 2 * 2 * 3 * 2  # datasets × models × seeds × attacks: one backdoored model each
    assert {len(p.cells) for p in plans} == {3}  # undefended + 2 defenses share it
    hashes = [c.config_hash for p in plans for c in p.cells]
    assert len(set(hashes)) == len(hashes) == 72
    assert {(p.dataset, p.model) for p in plans} == {
        (d, m) for d in ("fashion-mnist", "mnist") for m in ("small-cnn", "wrn-16-1")
    }


def test_only_clean_label_cells_name_the_budget_rule() -> None:
    """SIG's budget rule changed (its poisoned images' clean originals are now included): its cells
    get new hashes, every other attack's keep theirs."""
    plans = {p.attack.name: p for p in plan_grid(tiny(attacks=["badnets", "sig"], defenses=[FINETUNE]))}
    assert "defense_budget" in plans["sig"].base()
    assert "defense_budget" not in plans["badnets"].base()


def test_single_and_list_fields_are_exclusive_in_a_suite(tmp_path: Path) -> None:
    path = tmp_path / "both.toml"
    path.write_text('model = "small-cnn"\nmodels = ["wrn-16-1"]\n')
    with pytest.raises(ConfigError, match="either `model` or `models`"):
        load_suite(str(path))
    assert tiny().grid_models == ["small-cnn"] and tiny().grid_datasets == ["fashion-mnist"]
    assert tiny(models=["wrn-16-1", "small-cnn"]).grid_models == ["wrn-16-1", "small-cnn"]


def test_resume_after_interrupt_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    cfg = tiny(seeds=[0, 1], defenses=[FINETUNE])
    store = ResultStore(tmp_path / "r.sqlite")
    seen: list[CellResult] = []

    def kill_at_third(row: CellResult) -> None:
        seen.append(row)
        if len(seen) == 3:
            raise KeyboardInterrupt  # like Ctrl-C right after the third cell was stored

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, kill_at_third, store=store)
    before = {r.config_hash: r for r in store.rows()}
    assert len(before) == 3

    fresh: list[CellResult] = []
    rows = run_benchmark(cfg, fresh.append, store=store)
    assert len(fresh) == 1  # only the missing cell ran
    assert len(rows) == len(store) == 4
    assert len({r.config_hash for r in rows}) == 4
    after = {r.config_hash: r for r in store.rows()}
    assert all(after[h] == row for h, row in before.items())  # stored rows untouched
    assert [(r.defense, r.seed) for r in rows] == [("none", 0), ("finetune", 0), ("none", 1), ("finetune", 1)]

    forced: list[CellResult] = []
    run_benchmark(cfg, forced.append, store=store, force=True)
    assert len(forced) == 4 and len(store) == 4  # recomputed and replaced, not duplicated


def test_failed_cell_is_stored_grid_carries_on_and_model_is_shared(
    tmp_path: Path, explode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained: list[str] = []
    original = bench.backdoored_model

    def counting(*args: Any, **kwargs: Any) -> Any:
        trained.append(args[2].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(bench, "backdoored_model", counting)
    cfg = tiny(seeds=[0], defenses=["explode", FINETUNE])
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_benchmark(cfg, store=store)
        assert [(r.defense, r.status) for r in rows] == [
            ("none", "ok"),
            ("explode", "failed"),
            ("finetune", "ok"),
        ]
        assert trained == ["badnets"]  # one backdoored model for all three cells
        failed = store.get(rows[1].config_hash)
        assert failed is not None and failed.status == "failed" and "kaboom" in failed.error
        assert failed.provenance.defense_plugin is not None and failed.setting["train_size"] == 600
        retried: list[CellResult] = []
        run_benchmark(cfg, retried.append, store=store)
        assert [r.defense for r in retried] == ["explode"]  # failed cells are retried, ok ones skipped


def test_unknown_executor_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="Available: local, ray"):
        run_benchmark(tiny(), executor="spark")
    with pytest.raises(BdtkError, match="only applies to --executor ray"):
        run_benchmark(tiny(), ray_address="127.0.0.1:6379")
    result = CliRunner().invoke(app, ["benchmark", "--executor", "spark", "--db", str(tmp_path / "r.sqlite")])
    assert result.exit_code == 2 and "Unknown executor 'spark'" in result.output
    unreachable = [
        "benchmark",
        "--executor",
        "ray",
        "--ray-address",
        "127.0.0.1:9",
        "--db",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(app, unreachable)
    assert result.exit_code == 2 and "Cannot reach the Ray cluster" in result.output
    assert not (tmp_path / "r.sqlite").exists()  # nothing was created before the error


def test_builtin_suites_validate_against_the_registry() -> None:
    assert {"quick", "paper"} <= set(available_suites())
    for name in ("quick", "paper"):
        suite = load_suite(name)
        assert suite.description
        plans = plan_grid(BenchmarkConfig.model_validate(suite.benchmark_values()))
        references = 2 if suite.clean_reference else 1  # the undefended and the clean-model rows
        assert plans and all(len(p.cells) == references + len(suite.defenses) for p in plans)


BAD_SUITE = """\
description = "broken on purpose"
seeds = [0, 1]

[training]
epochs = 0

[[attacks]]
name = "badnets"

[[attacks]]
name = "blended"
colour = "red"
"""


def test_malformed_suite_names_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_SUITE)
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    message = str(info.value)
    assert "training.epochs (line 5)" in message
    assert "attacks.1.colour (line 12)" in message
    path.write_text('description = "x"\nseeds = [0,, 1]\n')
    with pytest.raises(ConfigError, match="line 2"):
        load_suite(str(path))
    with pytest.raises(UnknownNameError, match="Did you mean 'quick'"):
        load_suite("quik")


def test_a_benchmark_config_file_is_typed_as_written(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('seeds = [true]\nthreads = true\nclean_ratio = "0.1"\n')
    result = CliRunner().invoke(app, ["benchmark", "--config", str(path), "--db", str(tmp_path / "r.sqlite")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "seeds: [true] is a boolean, not a number" in said
    assert "threads: true is a boolean" in said and 'clean_ratio: "0.1" is a string, not a number' in said


def test_a_suite_is_typed_as_toml_is(tmp_path: Path) -> None:
    """A quoted number or a boolean where a number belongs is reported, not converted: lax
    conversion would make `seeds = [true, "1"]` seed 1 twice."""
    path = tmp_path / "typed.toml"
    path.write_text(
        'attacks = ["badnets"]\nseeds = [true, "1"]\nclean_ratio = "0.1"\n[training]\nepochs = 2\n'
    )
    with pytest.raises(ConfigError) as info:
        load_suite(str(path))
    message = str(info.value)
    assert 'seeds (line 2): [true, "1"] is a boolean, not a number' in message
    assert 'clean_ratio (line 3): "0.1" is a string, not a number' in message
    assert "training.epochs" not in message  # a real integer passes
    path.write_text('attacks = ["badnets"]\nclean_ratio = 0.9\n')
    with pytest.raises(ConfigError, match=r"clean_ratio \(line 2\).*\(valid: 0 < clean_ratio ≤ 0\.5\)"):
        load_suite(str(path))


TINY_SUITE = """\
description = "the tiny grid of these tests"
model = "small-cnn"
train_size = 600
test_size = 200
device = "cpu"
seeds = [0]

[training]
epochs = 1

[[defenses]]
name = "finetune"
config = { epochs = 1 }
"""


def test_cli_suite_run_resumes_and_feeds_the_leaderboard(tmp_path: Path) -> None:
    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY_SUITE)
    db, out = tmp_path / "r.sqlite", tmp_path / "results.json"
    args = ["benchmark", "--suite", str(suite), "--db", str(db), "--output", str(out)]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    # 600 training images at the default 5 % budget leave 6 val images for 10 classes
    assert "The defender's val part holds 6 images" in " ".join(first.output.split())
    with ResultStore(db) as store:
        assert [(r.defense, r.status) for r in store.rows()] == [("finetune", "ok"), ("none", "ok")]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 cells already in" in again.output
    board = runner.invoke(app, ["leaderboard", "--db", str(db), "--json", str(tmp_path / "lb.json")])
    assert board.exit_code == 0, board.output
    assert "finetune" in (tmp_path / "lb.json").read_text()
    both = runner.invoke(app, [*args, "--config", str(suite)])
    assert both.exit_code == 2 and "either --suite or --config" in both.output


def test_notes_and_errors_are_printed_below_the_table_not_squeezed_into_it() -> None:
    prov = Provenance(
        bdtk="0", torch="0", python="3", device="cpu", date="d", attack_plugin="a", defense_plugin=None
    )
    common = {"dataset": "fashion-mnist", "model": "wrn-16-1", "attack": "badnets", "attack_config": {}}
    ok = CellResult(**common, defense="mcldef", seed=0, notes="flagged [0]", config_hash="x", provenance=prov)
    bad = CellResult(
        **common, defense="nad", seed=0, status="failed", error="boom", notes="Traceback…", config_hash="y",
        provenance=prov,
    )  # fmt: skip
    assert "notes" not in [c.header for c in results_table([ok, bad]).columns]
    out = Console(width=80, record=True, file=io.StringIO())
    for line in results_notes([ok, bad]):
        out.print(line, highlight=False)
    text = out.export_text()
    assert "badnets / mcldef / seed 0: flagged [0]" in text  # brackets survive rich markup
    assert "badnets / nad / seed 0: failed: boom" in text and "Traceback" not in text


def test_the_results_table_fits_80_columns_without_cutting_labels_or_numbers() -> None:
    """The widest row the built-in plugins make (input-aware against mcldef:paper, re-tuned, a
    long cell) must be printed whole at 80 columns: no "…" in a header, a label or a number."""
    prov = Provenance(
        bdtk="0", torch="0", python="3", device="cpu", date="d", attack_plugin="a", defense_plugin=None
    )
    common = {"dataset": "fashion-mnist", "model": "wrn-16-1", "attack_config": {}, "provenance": prov}
    metrics = {"ba": 0.8834, "asr": 1.0, "ra": 0.0, "der": 0.5, "asr_retuned": 0.9913, "peak_mb": 12345.0}
    rows = [
        CellResult(
            **common, attack="input-aware", defense="mcldef", defense_preset="paper", seed=2,
            seconds=1234.5, config_hash="w", retune={"poisoned": 10}, **metrics,
        ),
        CellResult(
            **common, attack="badnets", defense="fine-pruning", seed=0, seconds=25.3, config_hash="n",
            retune={"poisoned": 10}, **metrics,
        ),
    ]  # fmt: skip
    out = Console(width=80, record=True, file=io.StringIO())
    out.print(results_table(rows))
    text = out.export_text()
    assert "…" not in text, text
    for cell in ("input-aware", "mcldef:paper", "fine-pruning", "ASR rt", "88.34", "100.00", "99.13", "1234"):
        assert cell in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
