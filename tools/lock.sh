#!/usr/bin/env bash
# Remake the two tested dependency sets from pyproject.toml's ranges, each as a full `pip freeze`:
#   sadr/constraints/locked.txt  the newest versions the ranges allow (what the README installs)
#   sadr/constraints/oldest.txt  every direct dependency at its lower bound (the rest as resolved with them)
# Then run `bash .ci/run`, which tests both. torch is recorded without its local build tag (+cpu, +cu130), so the
# locks hold for the CPU and the CUDA builds of the same release.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

freeze() {  # $1: venv, $2: output file, $3: what the set is
  {
    echo "# $3; made by tools/lock.sh on $(date -u +%F) with Python $("$1/bin/python" -c 'import platform; print(platform.python_version())')"
    "$1/bin/pip" freeze --exclude-editable | sed -E 's/^torch==([^+]+)\+.*/torch==\1/'
  } > "$2"
}

venv() {  # $1: venv, then pip arguments for the project
  local dir=$1; shift
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip packaging
  "$dir/bin/python" - "$dir/lowest.txt" <<'EOF'
import sys, tomllib
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
pins = []
for spec in project["dependencies"] + [spec for extra in project["optional-dependencies"].values() for spec in extra]:
    requirement = Requirement(spec)
    if requirement.name == project["name"]:  # an extra naming the project's other extras
        continue
    (low,) = [s.version for s in requirement.specifier if s.operator == ">="]
    pins.append(f"{requirement.name}=={low}")
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
EOF
  "$dir/bin/pip" install -q "torch$(grep '^torch==' "$dir/lowest.txt" | sed 's/^torch//')"
  "$dir/bin/pip" install -q -e ".[test]" "$@"
}

venv "$work/newest"
freeze "$work/newest" sadr/constraints/locked.txt "the locked set: newest versions within pyproject.toml's ranges"
# installed at the lower bounds from the start: a downgrade of the newest set would leave its extra packages behind
venv "$work/oldest" -c "$work/oldest/lowest.txt"
freeze "$work/oldest" sadr/constraints/oldest.txt "the oldest set: pyproject.toml's lower bounds"
echo "wrote sadr/constraints/locked.txt and sadr/constraints/oldest.txt"
