"""Indexed search-space entries (``arg.0``, ``arg.1``, ...) for list-valued init arguments:
DiffOp-net's per-level operator constants are swept element by element."""

from __future__ import annotations

import pytest

from sweeps.space import SpaceError, assemble, check_space, split_name, suggest


def test_split_and_assemble_gather_indexed_names_in_index_order():
    assert split_name("smoothing_mm.2") == ("smoothing_mm", 2)
    assert split_name("lambda_") == ("lambda_", None)
    assert split_name("a.b") == ("a.b", None)
    got = assemble({"lambda_": 3.0, "smoothing_mm.2": 0.5, "smoothing_mm.0": 8.0, "smoothing_mm.1": 4.0})
    assert got == {"lambda_": 3.0, "smoothing_mm": [8.0, 4.0, 0.5]}


def test_suggest_returns_init_arguments_with_the_list_assembled():
    import optuna

    from systems.diffop import DiffOpNet

    space = DiffOpNet.search_space
    check_space(space, DiffOpNet)
    trial = optuna.trial.FixedTrial({"gamma": 2.0, "lambda_": 50.0, "smoothing_mm.0": 9.0, "smoothing_mm.1": 3.0,
                                     "smoothing_mm.2": 1.5})
    args = suggest(trial, space)
    assert args == {"gamma": 2.0, "lambda_": 50.0, "smoothing_mm": [9.0, 3.0, 1.5]}
    m = DiffOpNet(width=2, **args)  # and the system takes them
    assert m.smoothing_mm == [9.0, 3.0, 1.5] and m.lambda_ == 50.0


@pytest.mark.parametrize("space,msg", [
    ({"smoothing_mm.1": {"type": "float", "low": 1.0, "high": 2.0}}, r"smoothing_mm\.0 \.\. smoothing_mm\.0"),
    ({"smoothing_mm": {"type": "float", "low": 1.0, "high": 2.0},
      "smoothing_mm.0": {"type": "float", "low": 1.0, "high": 2.0}}, "both whole and by element"),
    ({"nope.0": {"type": "float", "low": 1.0, "high": 2.0}}, "not an argument"),
])
def test_bad_indexed_spaces_are_refused_naming_the_parameter(space, msg):
    from systems.diffop import DiffOpNet

    with pytest.raises(SpaceError, match=msg):
        check_space(space, DiffOpNet)
