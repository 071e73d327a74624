"""benchmarks/fluency_bench.py on a tiny GPT-J shape: its three ways of sampling, timed, and their texts compared."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "benchmarks" / "fluency_bench.py"


def test_tiny_shape_times_the_three_ways_and_the_batched_ways_draw_the_same_texts(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--random-shape", "--tiny", "--model", "gpt-j", "--cases", "2",
                          "--prompts-per-case", "0", "--length", "12", "--rounds", "1", "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert "2 cases, 6 texts of 12 tokens" in out and "warning" not in out
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([a-z ]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)}
    assert list(rows) == ["one stream per case", "rows of one case", "rows of all cases"]
    assert rows["one stream per case"][1] == "1.000"
    assert rows["rows of one case"][2] == rows["rows of all cases"][2]  # the same texts, the same FL
