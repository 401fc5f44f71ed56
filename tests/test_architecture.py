"""The package's layers (issue 32): no import circle, nothing below training/ imports it, and the walk a reader
makes following the config from train() stays short (tests/code_walk.py reads the source; nothing is run)."""
from code_walk import config_walk, cycles, import_graph

TRAINING = "perpneg3d.training"


def test_cycles_finds_a_circle_and_only_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_lower_layer_imports_training():
    graph = import_graph()
    assert "perpneg3d.saved_config" in graph["perpneg3d.config"]  # the refine stage's name, read below training/
    lower = {m: sorted(d for d in deps if d.startswith(TRAINING)) for m, deps in graph.items()
             if not m.startswith(TRAINING)}
    assert {m: d for m, d in lower.items() if d} == {}


def test_the_config_walk_from_train_plans_first_and_stays_short():
    walk = config_walk()
    stays = walk.stays
    figures = walk.figures()
    assert [m for m, _ in stays[:2]] == [f"{TRAINING}.run", f"{TRAINING}.plan"]  # the decision comes first
    assert figures["entries"][f"{TRAINING}.plan"] == 1                            # and is made once
    assert figures["stays"] <= 15 and figures["climbs"] <= 3
    arrivals = {m: n - (m == stays[0][0]) for m, n in figures["entries"].items()}  # the start is not an entry
    assert max(n for m, n in arrivals.items() if m.startswith(TRAINING)) <= 2
