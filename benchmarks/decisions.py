"""How two runs of the same cases differ per prompt, as the benchmarks report it: which compared decisions
(p(good) > p(bad)) differ, how many of those are ties that other rounding may break, and the largest relative gap
|p(good) − p(bad)| / max of a differing decision."""
from __future__ import annotations

# two probabilities closer than this (relative) are a tie that other rounding (another batch shape, TF32 products) may
# break; as in tests/test_parallel_cases.py
TIE_RTOL = {"float32": 1e-5, "float64": 1e-5, "tf32": 1e-2, "bfloat16": 1e-2, "float16": 1e-2}


def decisions(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(decision, p_good, p_bad) of every compared prompt of every case's edited model, in order."""
    return [(value, good, bad) for row in rows for entry in row["edited"].values() if "p_bad" in entry
            for value, good, bad in zip(entry["value"], entry["p_good"], entry["p_bad"])]


def differing(reference: list[dict], rows: list[dict], tie_rtol: float) -> str:
    """"k/n (ties; largest gap g)": k of the n decisions of `rows` differ from `reference`'s, `ties` of them within
    `tie_rtol` in the reference run."""
    ours = decisions(rows)
    differ = [a for a, b in zip(decisions(reference), ours) if a[0] != b[0]]
    gaps = [abs(good - bad) / max(good, bad) for _, good, bad in differ]
    ties = sum(gap <= tie_rtol for gap in gaps)
    largest = f"; largest gap {max(gaps):.1e}" if gaps else ""
    return f"{len(differ)}/{len(ours)} ({ties}{largest})"
