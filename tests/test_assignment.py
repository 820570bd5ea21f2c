"""``rein_kernels.assign``, the Mask2Former matching on the device, against scipy's
``linear_sum_assignment`` (``assign_reference``): the same assignment to the bit, ties
included, on poisoned outputs; on any strides; with clear errors for what it does not do."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rein_kernels._common as common
from _parity import guards_intact

pytest.importorskip("scipy")

from rein_kernels.assignment import assign, assign_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BIG = torch.finfo(torch.float32).max  # what the loss writes for a NaN or infinite cost

# How costs come: continuous, and the kinds where scipy's tie-breaking decides (integer
# costs with small coefficients tie everywhere; a constant matrix; saturated entries)
KINDS = ("normal", "binary", "constant", "saturated", "quarters", "large")


def _costs(kind: str, P: int, Q: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "binary":
        return torch.randint(0, 2, (P, Q, K), generator=g).float()
    if kind == "constant":
        return torch.full((P, Q, K), 3.0)
    if kind == "quarters":
        return (4 * torch.randn(P, Q, K, generator=g)).round() / 4
    c = torch.randn(P, Q, K, generator=g)
    if kind == "saturated":
        c[torch.rand(P, Q, K, generator=g) < 0.3] = BIG
    if kind == "large":
        c = 1e3 * c + 1e6
    return c


def _present(B: int, K: int, seed: int) -> torch.Tensor:
    """Some classes of each image; the first image has none and the last all (B >= 3)."""
    present = torch.rand(B, K, generator=torch.Generator().manual_seed(seed + 1)) < 0.6
    if B >= 3:
        present[0], present[-1] = False, True
    return present


def _assign_poisoned(cost, present):
    common.POISON = True
    common.GUARDS.clear()
    try:
        out = assign(cost, present)
        guards_intact()
    finally:
        common.POISON = False
        common.GUARDS.clear()
    return out


def _check(cost, present, seed=0):
    got = _assign_poisoned(cost.to(DEVICE), present.to(DEVICE))
    want = assign_reference(cost, present)
    P, Q, K = cost.shape
    query_of, class_of = (t.cpu() for t in got)
    assert torch.equal(query_of, want[0].cpu()), (query_of, want[0])
    assert torch.equal(class_of, want[1].cpu()), (class_of, want[1])
    # and it is an assignment: each class present has its own query, the others none
    for p in range(P):
        k = present[p % present.shape[0]].nonzero().flatten()
        assert torch.equal(class_of[p, query_of[p, k]], k)
        assert (class_of[p] < K).sum() == len(k)
        assert (query_of[p][~present[p % present.shape[0]]] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("P,B,Q,K", [(6, 3, 23, 19), (4, 2, 7, 5), (3, 3, 2, 1), (2, 1, 13, 12)])
def test_equals_scipy(kind, P, B, Q, K):
    _check(_costs(kind, P, Q, K, seed=Q * K), _present(B, K, seed=P))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(2, 37), st.data())
def test_equals_scipy_random(n_per_image, B, Q, data):
    K = data.draw(st.integers(1, Q - 1))
    kind = data.draw(st.sampled_from(KINDS))
    seed = data.draw(st.integers(0, 2**16))
    _check(_costs(kind, n_per_image * B, Q, K, seed), _present(B, K, seed))


def test_equals_scipy_on_small_integer_matrices():
    """Every small shape (2 to 6 queries, fewer classes), 12 problems each, costs 0, 1 or 2:
    where ties decide, each of scipy's tie-breaks shows."""
    g = torch.Generator().manual_seed(5)
    for Q in range(2, 7):
        for K in range(1, Q):
            cost = torch.randint(0, 3, (12, Q, K), generator=g).float()
            _check(cost, torch.rand(4, K, generator=g) < 0.8)


def test_a_tie_between_assigned_columns():
    """Column 0 (query 0) and 1 tie at the lowest distance, both assigned: scipy takes the
    one it scans first (query 1: it scans from the last query down), and the assignment
    follows from it: queries 0, 3, 2 for the classes."""
    rows = torch.tensor([[0.0, 0.0, 2.0, 0.0], [2.0, 2.0, 0.0, 0.0], [0.0, 2.0, 0.0, 1.0]])  # classes x queries
    cost, present = rows.t().contiguous()[None], torch.ones(1, 3, dtype=torch.bool)
    assert assign_reference(cost, present)[0].tolist() == [[0, 3, 2]]
    _check(cost, present)


def test_a_picked_columns_place_goes_to_the_last_one():
    """Class 1's search first takes query 2 (class 0's); scipy's `remaining` then puts its
    last entry (query 0) in query 2's place, before query 1, so of the free queries 0 and 1
    tied at the lowest distance it takes query 1, the later one: class 0 gets query 1."""
    rows = torch.tensor([[1.0, 1.0, 0.0, 5.0], [5.0, 5.0, 0.0, 5.0]])  # classes x queries
    cost, present = rows.t().contiguous()[None], torch.ones(1, 2, dtype=torch.bool)
    assert assign_reference(cost, present)[0].tolist() == [[1, 2]]
    _check(cost, present)


def test_equals_scipy_at_the_recipe_shape():
    """10 predictions x batch 4, 100 queries, 19 classes (the published recipe)."""
    _check(_costs("normal", 40, 100, 19, seed=7), _present(4, 19, seed=7))


def test_any_strides():
    """Costs as the loss lays them out ([L * B, Q, K] of a flat tensor) and as other
    callers might: transposed ([P, K, Q] memory) and sliced out of a wider tensor."""
    P, B, Q, K = 4, 2, 11, 6
    wide = _costs("normal", P, Q + 3, 2 * K, seed=3)
    present = _present(B, K, seed=3)
    for cost in (wide[:, 2:Q + 2, 1::2], _costs("binary", P, K, Q, seed=4).transpose(1, 2)):
        assert not cost.is_contiguous()
        _check(cost, present)


def test_no_problems_and_no_classes():
    query_of, class_of = assign(torch.randn(0, 5, 3, device=DEVICE), torch.ones(2, 3, dtype=torch.bool, device=DEVICE))
    assert query_of.shape == (0, 3) and class_of.shape == (0, 5)
    _check(_costs("normal", 2, 5, 3, seed=0), torch.zeros(1, 3, dtype=torch.bool))


def test_bad_input_is_clear():
    cost = torch.randn(2, 5, 3, device=DEVICE)
    present = torch.ones(1, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="fewer classes than queries.*K = 5, Q = 5: match on the host"):
        assign(torch.randn(2, 5, 5, device=DEVICE), torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"present must be \[B, K\] with K = 3"):
        assign(cost, torch.ones(1, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="B dividing P = 2"):
        assign(cost, torch.ones(3, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"cost must be a float tensor \[P, Q, K\]"):
        assign(cost[0], present)
    with pytest.raises(ValueError, match=r"cost must be a float tensor"):
        assign(cost.long(), present)


def test_opcheck():
    cost, present = _costs("normal", 4, 9, 5, seed=1).to(DEVICE), _present(2, 5, seed=1).to(DEVICE)
    torch.library.opcheck(assign, (cost, present))
