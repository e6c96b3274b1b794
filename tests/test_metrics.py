"""Tests for mcit.metrics.continual_metrics (hand-computed matrices + invariants)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcit.errors import McitError
from mcit.metrics import METRIC_NAMES, continual_metrics

# T = 3. Row 0 zero-shot, row t after task t; column i = task i.
MATRIX = [
    [10.0, 20.0, 30.0],
    [50.0, 25.0, 35.0],
    [52.0, 60.0, 38.0],
    [45.0, 55.0, 70.0],
]


def test_keys_are_exactly_the_documented_ones():
    out = continual_metrics(MATRIX)
    assert tuple(out) == METRIC_NAMES
    assert set(out) == {"MFT", "MFN", "MAA", "BWT", "FWT", "forgetting", "FAA_weighted"}


def test_hand_computed_t3():
    out = continual_metrics(MATRIX, test_sizes=[1, 1, 2])
    assert out["MFT"] == pytest.approx((50 + 60 + 70) / 3)
    assert out["MFN"] == pytest.approx((45 + 55 + 70) / 3)
    # MAA: mean of 50, (52+60)/2 = 56, (45+55+70)/3
    assert out["MAA"] == pytest.approx((50 + 56 + 170 / 3) / 3)
    # BWT: (45-50, 55-60)
    assert out["BWT"] == pytest.approx(-5.0)
    # forgetting: task 1 best ever 52 (after task 2, not the diagonal) -> 7; task 2 -> 5
    assert out["forgetting"] == pytest.approx(6.0)
    # FWT: (A[1,2]-A[0,2], A[2,3]-A[0,3]) = (25-20, 38-30)
    assert out["FWT"] == pytest.approx(6.5)
    assert out["FAA_weighted"] == pytest.approx((45 + 55 + 2 * 70) / 4)


def test_faa_weighted_none_without_sizes():
    assert continual_metrics(MATRIX)["FAA_weighted"] is None


def test_equal_sizes_give_faa_equal_to_mfn():
    out = continual_metrics(MATRIX, test_sizes=[7, 7, 7])
    assert out["FAA_weighted"] == pytest.approx(out["MFN"])


def test_t1_undefined_values_are_none_never_nan():
    out = continual_metrics([[12.5], [80.0]], test_sizes=[100])
    assert out["MFT"] == 80.0
    assert out["MFN"] == 80.0
    assert out["MAA"] == 80.0
    assert out["FAA_weighted"] == 80.0
    assert out["BWT"] is None and out["forgetting"] is None and out["FWT"] is None


def test_t2_values():
    out = continual_metrics([[0.0, 10.0], [60.0, 30.0], [40.0, 90.0]])
    assert out["BWT"] == -20.0
    assert out["forgetting"] == 20.0
    assert out["FWT"] == 20.0
    assert out["MAA"] == (60.0 + 65.0) / 2


def test_no_rounding_full_precision():
    out = continual_metrics([[0.0, 0.0, 0.0], [1.0, 0, 0], [1, 1, 0], [1.0, 1.0, 1.0 / 3.0]])
    assert out["MFN"] == (1.0 + 1.0 + 1.0 / 3.0) / 3


def test_accepts_ints_and_numpy():
    np = pytest.importorskip("numpy", reason="numpy is a project dependency")
    out_np = continual_metrics(np.array(MATRIX), test_sizes=np.array([1, 1, 2]).tolist())
    assert out_np == continual_metrics(MATRIX, test_sizes=[1, 1, 2])
    ints = [[int(v) for v in row] for row in MATRIX]
    assert continual_metrics(ints)["MFT"] == 60.0


@pytest.mark.parametrize(
    "matrix, fragment",
    [
        ([[1.0, 2.0]], "T+1 >= 2 rows"),
        ([], "T+1 >= 2 rows"),
        ([[1.0, 2.0], [1.0, 2.0]], "row 0 (zero-shot) has 2 value(s), expected T = 1"),
        ([[1.0, 2.0], [3.0], [4.0, 5.0]], "row 1 (after task 1) has 1 value(s)"),
        ([[1.0, 2.0], [3.0, 4.0], [4.0, 5.0, 6.0]], "row 2 (after task 2) has 3"),
        ([[1.0], [float("nan")]], "row 1 (after task 1), column 1"),
        ([[float("inf")], [1.0]], "row 0 (zero-shot), column 1"),
        ([[1.0], [None]], "is not a number"),
        ([[1.0, 2.0], [1.0, None], [3.0, 4.0]], "row 1 (after task 1), column 2: None is not a number"),
        ([[1.0], ["abc"]], "is not a number"),
        ([[1.0], 5.0], "row 1"),
        (5, "accuracy matrix must be a list of rows, got int"),
    ],
)
def test_bad_matrices_raise_naming_the_row(matrix, fragment):
    with pytest.raises(McitError) as info:
        continual_metrics(matrix)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "sizes, fragment",
    [
        ([1, 2], "expected one per task (3)"),
        ([1, -1, 2], "must be a finite number >= 0"),
        ([0, 0, 0], "test_sizes must not all be zero"),
        ([1, "x", 2], "is not a number"),
    ],
)
def test_bad_test_sizes(sizes, fragment):
    with pytest.raises(McitError) as info:
        continual_metrics(MATRIX, test_sizes=sizes)
    assert fragment in str(info.value)


scores = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)


@st.composite
def matrices(draw):
    t = draw(st.integers(min_value=1, max_value=6))
    return [draw(st.lists(scores, min_size=t, max_size=t)) for _ in range(t + 1)]


@settings(max_examples=200, deadline=None)
@given(matrices())
def test_invariants(matrix):
    out = continual_metrics(matrix, test_sizes=[1] * len(matrix[0]))
    t = len(matrix[0])
    for name in ("MFT", "MFN", "MAA", "FAA_weighted"):
        assert 0.0 - 1e-9 <= out[name] <= 100.0 + 1e-9
        assert not math.isnan(out[name])
    assert out["FAA_weighted"] == pytest.approx(out["MFN"])
    if t == 1:
        assert out["BWT"] is None and out["forgetting"] is None and out["FWT"] is None
    else:
        # forgetting uses the best score ever reached (which includes the diagonal),
        # so it is never negative and never smaller than -BWT.
        assert out["forgetting"] >= -1e-9
        assert out["forgetting"] >= -out["BWT"] - 1e-9
        assert -100.0 - 1e-9 <= out["FWT"] <= 100.0 + 1e-9


@settings(max_examples=100, deadline=None)
@given(matrices())
def test_constant_columns_mean_no_forgetting(matrix):
    # If nothing ever changes after a task is learnt, BWT and forgetting are exactly 0.
    t = len(matrix[0])
    fixed = [list(matrix[0])] + [[matrix[-1][i] for i in range(t)] for _ in range(t)]
    out = continual_metrics(fixed)
    if t > 1:
        assert out["BWT"] == 0.0
        assert out["forgetting"] == 0.0


def test_numpy_float32_scalars_are_read_as_numbers():
    import numpy as np

    as32 = [[np.float32(v) for v in row] for row in MATRIX]  # not float subclasses, unlike float64
    assert continual_metrics(as32) == pytest.approx(continual_metrics(MATRIX))


def test_metrics_for_decides_by_walk_and_shape():
    from mcit.metrics import metrics_for

    # a one-task joint run has T + 1 = 2 rows, like a sequential one: still final-row metrics only
    joint = metrics_for([[10.0], [70.0]], [4], "joint")
    assert joint["MFN"] == 70.0 and joint["FAA_weighted"] == 70.0 and joint["MFT"] is None and joint["BWT"] is None
    # a sequential run cut short (fewer rows than T + 1): no stream metrics either
    short = metrics_for([[10.0, 20.0], [80.0, 40.0]], [1, 3], "sequential")
    assert short["MFT"] is None and short["MFN"] == 60.0 and short["FAA_weighted"] == 0.25 * 80 + 0.75 * 40
    # no test samples at all: FAA_weighted undefined, MFN still the plain mean
    empty = metrics_for([[10.0, 20.0], [80.0, 40.0]], [0, 0], "joint")
    assert empty["FAA_weighted"] is None and empty["MFN"] == 60.0


def test_general_metrics_known_answer():
    from mcit.metrics import GENERAL_METRIC_NAMES, general_metrics

    out = general_metrics([[50.0, 70.0], [30.0, 40.0], [45.0, 55.0]])
    assert out == {"start": 60.0, "final": 50.0, "change": -10.0, "lowest": 35.0}
    assert general_metrics([[], []]) == dict.fromkeys(GENERAL_METRIC_NAMES)
    assert general_metrics([[10.0], [20.0]])["lowest"] == 10.0


def test_prediction_spread_known_answer():
    from mcit.metrics import prediction_spread

    refs = [["red"], ["blue"], ["red"], ["green"], ["Red "]]
    out = prediction_spread([" Red", "red", "RED ", "red", "blue"], refs)
    assert out == {"top": "red", "top_share": 0.8, "distinct": 2, "reference_top_share": 0.6, "collapsed": False}
    collapsed = prediction_spread(["red"] * 10, [["red"], ["blue"]] * 5)
    assert collapsed["collapsed"] and collapsed["top_share"] == 1.0 and collapsed["reference_top_share"] == 0.5
    # one answer everywhere is no collapse when the references are the same everywhere too
    assert not prediction_spread(["yes"] * 10, [["yes"]] * 10)["collapsed"]
    assert prediction_spread(["a"] * 19 + ["b"], [["a"], ["b"]] * 10)["collapsed"]  # 95% > 90%
    assert not prediction_spread(["a"] * 9 + ["b"], [["a"], ["b"]] * 5)["collapsed"]  # 90% is not above 90%
    assert prediction_spread(["x"], [[]])["reference_top_share"] is None
    # references 90% one answer (not above the threshold): one answer everywhere still flags
    assert prediction_spread(["a"] * 10, [["a"]] * 9 + [["b"]])["collapsed"]
    assert prediction_spread([], []) == {"top": None, "top_share": None, "distinct": 0,
                                         "reference_top_share": None, "collapsed": False}
