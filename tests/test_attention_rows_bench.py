"""benchmarks/attention_rows_bench.py: its three modes time the same loss, with rows from the kernel or from maps."""
import importlib.util
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("attention_rows_bench",
                                              Path(__file__).parents[1] / "benchmarks" / "attention_rows_bench.py")
bench = sys.modules.setdefault("attention_rows_bench", importlib.util.module_from_spec(SPEC))
SPEC.loader.exec_module(bench)


def test_rows_and_eager_maps_give_the_same_loss_and_plain_gives_less(tmp_path):
    model = bench.bench_model(None, str(tmp_path)).eval().requires_grad_(False)
    batch, last = bench.make_batch(model.config.vocab_size, 4, 12)
    losses = {}
    for mode, implementation in bench.MODES:
        model.set_attn_implementation(implementation)
        losses[mode] = bench.step_fn(model, batch, last, 4, mode)().item()
    assert losses["fast rows"] == pytest.approx(losses["eager maps"], rel=1e-5)
    assert losses["fast rows"] > losses["plain"] + 1e-3  # the rows' squares are in the loss


def test_the_bench_prints_each_mode_against_plain(capsys):
    bench.main(["--batch", "2", "--seq-len", "8", "--repeats", "1", "--injection-layer", "10"])
    table = capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["plain", "fast", "eager"]
