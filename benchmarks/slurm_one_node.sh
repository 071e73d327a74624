#!/usr/bin/env bash
# A one-node SLURM cluster on this machine from Debian's packages, then a sharded sweep through
# hydra/launcher=slurm (submitit) on a tiny model, checked against the same sweep run unsharded in one process, and a
# plain batch job (sadr-run on the offline default, fetched on first use) stopped by its time limit and resubmitted.
#
#   sudo bash benchmarks/slurm_one_node.sh            # as root: installs slurm-wlm and munge if missing
#
# It starts munged, slurmctld and slurmd in the background (no systemd needed) and stops them at the end.
# Uses the Python on PATH with sadr installed (pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/sadr-slurm.XXXX)
python=${PYTHON:-python}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get install -y -q slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /etc/munge
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=sadr-test
SlurmctldHost=$host
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /run/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
chown -R slurm:slurm /var/spool/slurmctld /var/log/slurm 2>/dev/null || true

cleanup() { pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true; }
trap cleanup EXIT
if command -v runuser >/dev/null && id munge >/dev/null 2>&1; then runuser -u munge -- munged --force; else munged --force; fi
slurmctld
slurmd
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix)' && break
  sleep 1
done
sinfo

# A tiny model and corpus, made offline, and a 2-configuration x 2-shard sweep through SLURM.
"$python" - "$work" <<'PY'
import sys
from pathlib import Path
from tests.editing import random_texts
from tests.tiny_models import make_model, make_tokenizer
root = Path(sys.argv[1])
make_model("llama").save_pretrained(root / "model")
make_tokenizer().save_pretrained(root / "model")
(root / "corpus.txt").write_text("\n\n".join(random_texts()))
PY
tiny=(model=local "model.source=$work/model" model.family=llama model.stats.corpus=file
      "model.stats.text_file=$work/corpus.txt" model.stats.sample_length=64 'editor.layers=[1]' editor.v_loss_layer=3
      editor.v_num_grad_steps=6 editor.v_lr=0.05 editor.clamp_norm_factor=100 'editor.context_templates=[[5,5]]'
      "dataset.path=$PWD/tests/fixtures/data/offline_counterfact.json" dataset.limit=2 "cache_dir=$work/cache")
start=$(date +%s)
"$python" -m sadr.cli.run -m hydra/launcher=slurm hydra.launcher.gpus_per_node=0 hydra.launcher.cpus_per_task=1 \
  hydra.launcher.mem_gb=2 hydra.launcher.timeout_min=30 "${tiny[@]}" sadr.lambda=0,0.5 dataset.shard=1/2,2/2 \
  "hydra.sweep.dir=$work/sharded"
echo "SLURM sweep of 4 jobs: $(( $(date +%s) - start )) s"
"$python" -m sadr.cli.run -m "${tiny[@]}" sadr.lambda=0,0.5 "hydra.sweep.dir=$work/whole" >/dev/null
"$python" - "$work" <<'PY'
import sys
from pathlib import Path
import pandas as pd
from sadr.evaluation.summary import summarize
root = Path(sys.argv[1])
sharded, whole = summarize(root / "sharded"), summarize(root / "whole")
assert set(sharded.loc[sharded.state == "edited", "shards"]) == {"2/2"}, sharded
metrics = [c for c in whole.columns if c.split(" ")[0] in ("ES", "PS", "NS", "DNS")]
key = lambda t: t[t.state == "edited"].sort_values("sadr.lambda")[["sadr.lambda", "n_cases", *metrics]].reset_index(drop=True)
pd.testing.assert_frame_equal(key(sharded), key(whole))
print(key(sharded).to_markdown(index=False))
print("OK: the SLURM sweep's merged shards equal the unsharded runs")
PY

# A batch job whose command is sadr-run, past its 1-minute time limit: SLURM's SIGTERM stops the run, whose log ends
# with what it keeps; the same script submitted again resumes, and its table is the one of a run never stopped.
cat > "$work/job.sh" <<JOB
#!/bin/bash
"$python" -m sadr.cli.run hydra.run.dir=$work/timelimit dataset.limit=20 progress.bar=false
JOB
sbatch --wait --time=1 --output="$work/job-stopped.out" "$work/job.sh" || true
grep "DUE TO TIME LIMIT" "$work/job-stopped.out"
tail -n 1 "$work/timelimit/run.log" | grep "terminated (SIGTERM): [0-9]* finished case(s) .*are kept in"
echo "stopped by the time limit with $(wc -l < "$work/timelimit/cases.jsonl") of 20 cases kept"
sbatch --wait --time=30 --output="$work/job-resumed.out" "$work/job.sh"
test "$(wc -l < "$work/timelimit/cases.jsonl")" -eq 20
"$python" -m sadr.cli.run hydra.run.dir="$work/uninterrupted" dataset.limit=20 progress.bar=false >/dev/null
cmp "$work/timelimit/metrics.csv" "$work/uninterrupted/metrics.csv"
echo "OK: the job stopped by its time limit resumed, and its metrics.csv equals an uninterrupted run's"
