"""Check that a small model actually knows the facts of the offline CounterFact-style dataset.

Scores every prompt of every record with teacher forcing (p(y|x) = exp(-mean NLL of the tokens
of " " + y after x)) and prints, per check, how many records / prompts pass:

* edit prompt (requested_rewrite.prompt with the subject filled in): p(target_true) > p(target_new)
* paraphrase prompts:   p(target_true) > p(target_new)
* neighborhood prompts: p(target_true) > p(target_new)
* attribute prompts:    p(target_new) > p(target_true)
* relation_specificity: mean p(ground_truth), and p(ground_truth) > p(target_new)

Usage (the offline default model, loaded as `sadr-run` loads it, and the packaged records):
    python benchmarks/check_offline_dataset.py [--model SOURCE] [--dataset FILE] [--show-failures]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sadr.conf.schema import default_cache_dir  # noqa: E402
from sadr.evaluation.scorer import score_pairs  # noqa: E402
from sadr.models.loading import load_model  # noqa: E402

DEFAULT_DATASET = REPO / "sadr" / "data" / "offline" / "counterfact_offline.json"


def pct(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.1f} %)" if n else "0/0"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2",
                    help="a model.source: the offline default (embedded:smollm2), a model folder, a .gguf file or a hub id")
    ap.add_argument("--cache-dir", default=default_cache_dir())
    ap.add_argument("--dataset", default=str(DEFAULT_DATASET))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--show-failures", action="store_true", help="also list every failing non-edit prompt")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    records = json.loads(Path(args.dataset).read_text(encoding="utf-8"))
    t0 = time.time()
    loaded = load_model(args.model, device="cpu", cache_dir=args.cache_dir)
    model, tok = loaded.model.eval(), loaded.tokenizer
    print(f"loaded model in {time.time() - t0:.1f} s; {len(records)} records")

    # Collect every (prompt, target) pair once; kind -> list of (record index, pair index of true, of new).
    prompts: list[str] = []
    targets: list[str] = []

    def add(p: str, t: str) -> int:
        prompts.append(p)
        targets.append(t)
        return len(prompts) - 1

    checks: dict[str, list[tuple[int, int, int]]] = {k: [] for k in ("edit", "paraphrase", "neighborhood", "attribute", "relspec")}
    for i, rec in enumerate(records):
        rw = rec["requested_rewrite"]
        new, true = rw["target_new"]["str"], rw["target_true"]["str"]
        edit_prompt = rw["prompt"].format(rw["subject"])
        checks["edit"].append((i, add(edit_prompt, true), add(edit_prompt, new)))
        for p in rec.get("paraphrase_prompts", []):
            checks["paraphrase"].append((i, add(p, true), add(p, new)))
        for p in rec.get("neighborhood_prompts", []):
            checks["neighborhood"].append((i, add(p, true), add(p, new)))
        for p in rec.get("attribute_prompts", []):
            # stored as (i, new, true): the check is "first beats second" for every kind
            checks["attribute"].append((i, add(p, new), add(p, true)))
        for rs in rec.get("relation_specificity", []):
            checks["relspec"].append((i, add(rs["prompt"], rs["ground_truth"]), add(rs["prompt"], new)))

    t1 = time.time()
    # score in length-sorted order so that each padded batch wastes little compute
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]) + len(targets[k]))
    sorted_nll = score_pairs(model, tok, [prompts[k] for k in order], [targets[k] for k in order],
                             batch_size=args.batch_size).tolist()
    nll = [0.0] * len(prompts)
    for k, v in zip(order, sorted_nll):
        nll[k] = v
    print(f"scored {len(prompts)} pairs in {time.time() - t1:.1f} s\n")

    def summarize(kind: str, label: str) -> list[int]:
        items = checks[kind]
        wins = [nll[a] < nll[b] for _, a, b in items]
        per_rec: dict[int, list[bool]] = {}
        for (i, _, _), w in zip(items, wins):
            per_rec.setdefault(i, []).append(w)
        all_ok = sum(all(v) for v in per_rec.values())
        frac = sum(sum(v) / len(v) for v in per_rec.values()) / max(1, len(per_rec))
        print(f"{label:<46} prompts {pct(sum(wins), len(wins)):<20} "
              f"records(all pass) {pct(all_ok, len(per_rec)):<20} mean per-record {100 * frac:.1f} %")
        return [i for i, v in sorted(per_rec.items()) if not all(v)]

    print("check (first beats second)")
    failing_edit = summarize("edit", "edit prompt: p(true) > p(new)")
    summarize("paraphrase", "paraphrase: p(true) > p(new)")
    summarize("neighborhood", "neighborhood: p(true) > p(new)")
    summarize("attribute", "attribute: p(new) > p(true)")
    summarize("relspec", "relation_specificity: p(gt) > p(target_new)")
    rs_p = [math.exp(-nll[a]) for _, a, _ in checks["relspec"]]
    if rs_p:
        print(f"relation_specificity: mean p(ground_truth) {sum(rs_p) / len(rs_p):.3f}, "
              f"median {sorted(rs_p)[len(rs_p) // 2]:.3f}, p > 0.1 for {pct(sum(p > 0.1 for p in rs_p), len(rs_p))}")
    edit_true = [math.exp(-nll[a]) for _, a, _ in checks["edit"]]
    edit_new = [math.exp(-nll[b]) for _, _, b in checks["edit"]]
    print(f"edit prompt: mean p(true) {sum(edit_true) / len(edit_true):.3f}, mean p(new) {sum(edit_new) / len(edit_new):.3f}")

    by_rel: dict[str, list[bool]] = {}
    for i, a, b in checks["edit"]:
        rw = records[i]["requested_rewrite"]
        by_rel.setdefault(f"{rw['relation_id']} {rw['prompt']}", []).append(nll[a] < nll[b])
    print("\nedit prompt by relation:")
    for rel, v in sorted(by_rel.items()):
        print(f"  {rel:<52} {pct(sum(v), len(v))}")

    if args.show_failures:
        print("\nfailing prompts (paraphrase / neighborhood / attribute / relation_specificity):")
        for kind in ("paraphrase", "neighborhood", "attribute", "relspec"):
            for i, a, b in checks[kind]:
                if not nll[a] < nll[b]:
                    print(f"  {kind} case_id {records[i]['case_id']}: {prompts[a]!r} "
                          f"{targets[a]!r} p={math.exp(-nll[a]):.3f} vs {targets[b]!r} p={math.exp(-nll[b]):.3f}")

    print(f"\nrecords failing the edit-prompt check: {len(failing_edit)}")
    for i in failing_edit:
        rw = records[i]["requested_rewrite"]
        _, a, b = checks["edit"][i]
        print(f"  case_id {records[i]['case_id']}: {rw['prompt'].format(rw['subject'])!r} "
              f"true {rw['target_true']['str']!r} p={math.exp(-nll[a]):.3f} vs new {rw['target_new']['str']!r} p={math.exp(-nll[b]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
