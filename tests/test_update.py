"""Closed-form updates against independent computations."""
import pytest
import torch

from sadr.editors.update import FactorizedMoment, independent_rank_one_updates, least_squares_update, rank_one_update


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (3 * n)


def test_rank_one_update_is_the_least_C_norm_solution_of_the_constraint():
    """min tr(ΔW C ΔWᵀ) s.t. ΔW k = r, solved independently: substitute M = ΔW C^½ and take the
    minimum-norm solution of the underdetermined linear system from lstsq."""
    d_out, d_in = 4, 6
    g = torch.Generator().manual_seed(0)
    C = _spd(d_in, 1)
    k = torch.randn(d_in, generator=g, dtype=torch.float64)
    r = torch.randn(d_out, generator=g, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(C)
    c_half_inv = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    c_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    a = c_half_inv @ k  # constraint: M a = r
    system = torch.kron(torch.eye(d_out, dtype=torch.float64), a[None, :])  # vec(M) row-major
    m = torch.linalg.lstsq(system, r[:, None], driver="gelsd").solution.reshape(d_out, d_in)
    expected = m @ c_half_inv
    got = rank_one_update(k, r, FactorizedMoment.of(C)).dense()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got @ k, r)
    assert torch.allclose(expected @ c_half @ c_half.T, expected @ C)


def test_rank_one_update_without_mom2_adjustment_uses_identity():
    k = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    r = torch.tensor([3.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(rank_one_update(k, r, None).dense(), torch.outer(r, k) / 9.0)


@pytest.mark.parametrize("n", [1, 5, 12])  # one request, a batch, more keys than dimensions
def test_least_squares_update_satisfies_the_normal_equations_and_matches_lstsq(n):
    """ΔW minimises Σ‖ΔW kᵢ − rᵢ‖² + λ tr(ΔW C ΔWᵀ): compare with lstsq on the stacked ridge system."""
    d_in, d_out, lam = 7, 3, 2.5
    g = torch.Generator().manual_seed(3)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    C = _spd(d_in, 4)
    got = least_squares_update(K, R, FactorizedMoment.of(C), lam)
    assert got.rank == n
    got = got.dense()
    # normal equations: ΔW (λC + KᵀK) = Rᵀ K
    torch.testing.assert_close(got @ (lam * C + K.T @ K), R.T @ K)
    # independent: ‖[K; √λ C^½] ΔWᵀ − [R; 0]‖² by least squares
    evals, evecs = torch.linalg.eigh(C)
    c_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    A = torch.cat([K, lam ** 0.5 * c_half])
    B = torch.cat([R, torch.zeros(d_in, d_out, dtype=torch.float64)])
    expected = torch.linalg.lstsq(A, B).solution.T
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_reference_rank_one_update_is_exact_at_k0_along_the_direction_C_inv_k_bar():
    """ROME's code: ΔW k₀ = r at the bare prompt's key k₀, every row of ΔW along C⁻¹ k̄ (checked with numpy)."""
    import numpy as np

    d_out, d_in = 4, 6
    g = torch.Generator().manual_seed(5)
    C = _spd(d_in, 6)
    k_bar, k0 = (torch.randn(d_in, generator=g, dtype=torch.float64) for _ in range(2))
    r = torch.randn(d_out, generator=g, dtype=torch.float64)
    got = rank_one_update(k_bar, r, FactorizedMoment.of(C), exact_key=k0).dense()
    torch.testing.assert_close(got @ k0, r)
    direction = np.linalg.inv(C.numpy()) @ k_bar.numpy()
    _, singular, vh = np.linalg.svd(got.numpy())
    assert singular[1] < 1e-12 * singular[0]  # rank one
    assert abs(abs(vh[0] @ direction) / np.linalg.norm(direction) - 1) < 1e-12
    assert not torch.allclose(got @ k_bar, r)  # exact at k₀, not at k̄
    torch.testing.assert_close(rank_one_update(k_bar, r, FactorizedMoment.of(C), exact_key=k_bar).dense(),
                               rank_one_update(k_bar, r, FactorizedMoment.of(C)).dense())


def test_independent_rank_one_updates_are_each_rows_own_least_squares_update():
    n, d_in, d_out, lam = 4, 7, 3, 2.5
    g = torch.Generator().manual_seed(5)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    C = FactorizedMoment.of(_spd(d_in, 6))
    updates = independent_rank_one_updates(K, R, C, lam)
    for i in range(n):
        assert updates[i].rank == 1
        torch.testing.assert_close(updates[i].dense(), least_squares_update(K[i : i + 1], R[i : i + 1], C, lam).dense())


def test_factoring_in_place_gives_the_factors_of_a_copy_without_a_second_matrix():
    """In place, C's own storage holds its factors, column-major as a fresh factorisation returns them (so a solve
    copies nothing); a C that is symmetric only up to rounding is first mirrored from its upper triangle."""
    C = _spd(9, 7)
    C = (C + C.T) / 2  # exactly symmetric
    kept = FactorizedMoment.of(C)
    original = C.clone()
    assert torch.equal(C, original)  # by default C is left as it was
    in_place = FactorizedMoment.of(C, overwrite=True)
    assert in_place.lu.data_ptr() == C.data_ptr() and in_place.lu.mT.is_contiguous() and kept.lu.mT.is_contiguous()
    assert torch.equal(in_place.lu, kept.lu) and torch.equal(in_place.pivots, kept.pivots)
    rhs = torch.randn(9, 2, dtype=torch.float64)
    torch.testing.assert_close(original @ in_place.solve(rhs), rhs)

    skewed = original.clone()
    skewed[5, 1] += 1e-9  # below the diagonal: the upper triangle wins
    torch.testing.assert_close(FactorizedMoment.of(skewed, overwrite=True).solve(rhs), in_place.solve(rhs), rtol=0, atol=0)


@pytest.mark.parametrize("width", [1, 7, 16, 37])
def test_mirroring_the_upper_triangle_copies_it_below_the_diagonal_in_place(width):
    from sadr.editors.update import mirror_upper_triangle_

    matrix = torch.randn(width, width, dtype=torch.float64)
    expected = matrix.triu() + matrix.triu(1).T
    pointer = matrix.data_ptr()
    assert mirror_upper_triangle_(matrix, blocks=3) is matrix and matrix.data_ptr() == pointer
    assert torch.equal(matrix, expected)


def test_float32_factors_take_half_the_memory_and_solve_to_float32_accuracy():
    """On a C of condition number about 1e3, float32 factors give float64 solves within 1e3 × float32 rounding of the
    float64 factors' (and really are float32: the results differ); the updates built on them are float64."""
    g = torch.Generator().manual_seed(8)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    C = basis @ torch.diag(torch.logspace(0, -3, 40, dtype=torch.float64)) @ basis.T
    C = (C + C.T) / 2
    double, single = FactorizedMoment.of(C), FactorizedMoment.of(C, dtype=torch.float32)
    assert single.lu.dtype == torch.float32 and single.lu.mT.is_contiguous()
    assert single.lu.element_size() * 2 == double.lu.element_size()
    rhs = torch.randn(40, 3, dtype=torch.float64)
    exact, approximate = double.solve(rhs), single.solve(rhs)
    assert approximate.dtype == torch.float64 and not torch.equal(approximate, exact)
    condition = torch.linalg.cond(C).item()
    assert 500 < condition < 2000
    assert (approximate - exact).norm() <= condition * 1e-6 * exact.norm()
    in_place = FactorizedMoment.of(C.clone(), overwrite=True, dtype=torch.float32)
    assert torch.equal(in_place.lu, single.lu) and torch.equal(in_place.pivots, single.pivots)
    K = torch.randn(2, 40, dtype=torch.float64)
    R = torch.randn(2, 5, dtype=torch.float64)
    update = least_squares_update(K, R, single, 2.5)
    assert update.left.dtype == update.right.dtype == torch.float64
    expected = least_squares_update(K, R, double, 2.5).dense()
    assert (update.dense() - expected).norm() <= condition * 1e-6 * expected.norm()


def test_factors_moved_to_another_device_stay_column_major_and_solve_onto_the_right_hand_sides_device():
    """`model.stats.factor_device=cpu` moves the factors made on the model's device to the host: the copy is the same
    factors, still in the layout a solve reads without copying, and its solves return where the keys are (float64)."""
    C = _spd(12, 9)
    for dtype in (torch.float64, torch.float32):
        factors = FactorizedMoment.of(C.clone(), overwrite=True, dtype=dtype)
        moved = factors.to(torch.device("cpu"))
        assert moved.lu.mT.is_contiguous() and torch.equal(moved.lu, factors.lu) and torch.equal(moved.pivots, factors.pivots)
        rhs = torch.randn(12, 3, dtype=torch.float32)
        solved = moved.solve(rhs)
        assert solved.dtype == torch.float64 and solved.device == rhs.device
        assert torch.equal(solved, factors.solve(rhs)) and torch.equal(moved.solve(rhs[:, 1]), factors.solve(rhs[:, 1]))


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_singular_second_moment_is_refused_rather_than_factored_into_infinite_solves(overwrite, dtype):
    """A key coordinate that is always zero (a dead unit) leaves C an exactly zero row and column: factoring it must
    fail, in place or not, rather than return factors whose solves are inf or NaN."""
    C = _spd(6, 10)
    C[2, :] = 0.0
    C[:, 2] = 0.0
    with pytest.raises(torch.linalg.LinAlgError, match=r"^C is singular: the pivot U\[2,2\] of its LU factors is zero$"):
        FactorizedMoment.of(C.clone(), overwrite=overwrite, dtype=dtype)


def test_independent_rank_one_updates_keep_float64_residuals_to_float64_accuracy():
    """Each ΔWᵢ = rᵢ uᵢᵀ solves its own normal equations ΔWᵢ (λC + kᵢkᵢᵀ) = rᵢ kᵢᵀ to float64 accuracy, with rᵢ as
    given: a float64 residual is not rounded through float32 (which would leave errors near 1e-8)."""
    n, d_in, d_out, lam = 3, 7, 5, 2.5
    g = torch.Generator().manual_seed(11)
    K = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64) / 3  # not representable in float32
    C = _spd(d_in, 12)
    for i, update in enumerate(independent_rank_one_updates(K, R, FactorizedMoment.of(C), lam)):
        assert update.left.dtype == update.right.dtype == torch.float64
        k, r = K[i : i + 1], R[i : i + 1]
        torch.testing.assert_close(update.dense() @ (lam * C + k.T @ k), r.T @ k, rtol=1e-12, atol=1e-13)
