"""Super tickets and Ticket-Share at MiniLM scale (issue: Liang et al. reproduction).

One command, resumable (runs already recorded are skipped); hours on 2 CPU cores:
  1. importance per task and seed                        (registry: study-<task>-importance-s<seed>);
     where the dominant study has fine-tuned that task and seed alike, that model is scored
  2. phase-transition sweeps on the phase tasks: winning / random / losing per seed; the other
     tasks get the winning sweep on the first seed (their super ticket for Ticket-Share).
     Level 0 (nothing pruned) is plain fine-tuning and the same run for every ticket type, so
     random and losing sweeps skip it and share the winning sweep's point → results/supertickets.jsonl
  3. Ticket-Share on the tasks with each task's best winning level, and plain MTL → same file
     (these start once every task's first-seed winning sweep is done, before the other curves);
     last, each task of both fine-tuned further on its own (reported, not served)
  4. benchmarks/studies/supertickets.md with the curves (benchmarks/results/phase-<task>.png); each super
     ticket (best winning level), Ticket-Share / MTL task and fine-tuning also → results/quality.jsonl

    python -m benchmarks.studies.supertickets
    python -m benchmarks.studies.supertickets --tasks rte --phase-tasks rte --seeds 42 --types winning,random --levels 0,20,40
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from benchmarks.common import GLUE, STUDY_REGISTRY
from benchmarks.studies.quality import FIRST_DEFAULT_LR, QUALITY, RESULTS, append, cli, read_jsonl, run_stage, set_jobs

HERE = Path(__file__).parent
RECORDS = RESULTS / "supertickets.jsonl"
REPORT = HERE / "supertickets.md"
STUDY = "supertickets"  # its records in quality.jsonl
FULL_DEFAULT_LR = FIRST_DEFAULT_LR["full"]  # the importance run's rate


def _done(name: str) -> bool:
    return any(r.get("name") == name for r in read_jsonl(RECORDS))


def _data(task: str, args) -> list[str]:
    args_ = ["--data-dir", str(args.data_root / task), "--epochs", str(args.epochs), "--registry", str(args.registry)]
    return args_ + (["--train-samples", str(args.sst2_train_samples)] if task == "sst2" else [])


def run(args) -> None:
    """Ordered so that each stage only needs earlier ones and Ticket-Share comes early: the
    first seed's importance; its winning sweeps (every task's super ticket) with the other
    seeds' importance; then Ticket-Share and plain MTL ahead of the remaining curves. Runs
    within a stage are independent (`--jobs N` runs N at a time)."""
    stage = functools.partial(run_stage, args.jobs)
    first, later = args.seeds[0], args.seeds[1:]
    phase_tasks = [task for task in args.tasks if task in args.phase_tasks]
    phase = [(task, seed) for task in phase_tasks for seed in later]
    stage(functools.partial(_importance, task, first, args) for task in args.tasks)
    stage([*(functools.partial(_sweep, task, first, "winning", args) for task in args.tasks),
           *(functools.partial(_importance, task, seed, args) for task, seed in phase)])
    multi_task = len(args.tasks) > 1
    stage([*(functools.partial(_shared, plain, args) for plain in (False, True) if multi_task),
           *(functools.partial(_sweep, task, first, kind, args) for task in phase_tasks
             for kind in args.types if kind != "winning"),
           *(functools.partial(_sweep, task, seed, kind, args) for task, seed in phase for kind in args.types),
           *(functools.partial(_fine_tune, plain, task, args) for plain in (False, True) for task in args.tasks
             if multi_task)])


def _importance(task: str, seed: int, args) -> None:
    name = f"study-{task}-importance-s{seed}"
    if _done(name):
        return
    tuned = _fine_tuned(task, seed, args)
    source = ["--fine-tuned", tuned] if tuned else []
    result = cli("train", "--method", "importance", "--task", task, "--seed", str(seed), "--name", name, *source, *_data(task, args))
    append(RECORDS, {"record": "importance", "name": name, "task": task, "seed": seed, "fine_tuned": tuned, **result})


def _fine_tuned(task: str, seed: int, args) -> str | None:
    """A full fine-tuning (e.g. the dominant study's) run exactly as the importance run would
    fine-tune: it is scored instead of fine-tuning again."""
    wanted = {"epochs": args.epochs, "seed": seed, "lr": FULL_DEFAULT_LR, "max_steps": None,
              "train_samples": args.sst2_train_samples if task == "sst2" else None}
    for r in reversed(read_jsonl(QUALITY)):
        if (r["method"], r["task"], r["seed"]) == ("full", task, seed):
            manifest = cli("registry", "show", r["artifact"], "--registry", str(args.registry))["manifest"]
            settings = {key: manifest["hyperparameters"].get(key) for key in wanted}
            if settings == wanted and manifest["details"].get("data") == str((args.data_root / task).resolve()):
                return r["artifact"]
    return None


def _sweep(task: str, seed: int, kind: str, args) -> None:
    """One sweep; a killed one resumes from its last finished level (`--resume`)."""
    name = f"study-{task}-superticket-{kind}-s{seed}"
    if _done(name):
        return
    levels = [level for level in args.levels.split(",") if kind == "winning" or float(level) > 0]
    result = cli("train", "--method", "superticket", "--task", task, "--seed", str(seed), "--ticket-type", kind,
                 "--levels", ",".join(levels), "--importance", f"study-{task}-importance-s{seed}", "--name", name,
                 "--resume", *_data(task, args))
    append(RECORDS, {"record": "sweep", "name": name, "task": task, "seed": seed, "ticket_type": kind, **result})


def _shared(plain: bool, args) -> None:
    """Ticket-Share on every task's best winning level, or plain MTL (all gates open)."""
    name = _shared_name(plain)
    if _done(name):
        return
    given = [f"{t}=study-{t}-superticket-winning-s{args.seeds[0]}" for t in args.tasks]
    result = cli("train", "--method", "ticketshare", "--tasks", ",".join(args.tasks), "--data-root", str(args.data_root),
                 "--epochs", str(args.epochs), "--seed", str(args.seeds[0]), "--name", name, "--registry", str(args.registry),
                 *(["--plain"] if plain else sum((["--superticket", g] for g in given), [])),
                 *(["--train-samples", str(args.sst2_train_samples)] if "sst2" in args.tasks else []))
    append(RECORDS, {"record": _shared_kind(plain), "name": name, **result})


def _shared_kind(plain: bool) -> str:
    """The record kind of a shared-encoder run; its registry names start with study-<kind>."""
    return "mtl" if plain else "ticketshare"


def _shared_name(plain: bool) -> str:
    return f"study-{_shared_kind(plain)}"


def _fine_tune(plain: bool, task: str, args) -> None:
    """The optional per-task fine-tuning after Ticket-Share (or plain MTL): that task's shared
    encoder, head and mask, trained further on the task alone; reported, not served."""
    base = _shared_name(plain)
    name = f"{base}-{task}-finetuned"
    if _done(name):
        return
    result = cli("train", "--method", "gated-full", "--structure", f"{base}-{task}", "--seed", str(args.seeds[0]),
                 "--name", name, *_data(task, args))
    append(RECORDS, {"record": "finetune", "name": name, "base": _shared_kind(plain), **result})


def _sync_quality(records: list[dict], args) -> None:
    """Add each outcome the study has (super ticket = best winning level, Ticket-Share / MTL
    task, fine-tuning) to quality.jsonl once, in its shared shape, keyed by artifact."""
    known = {r["artifact"] for r in read_jsonl(QUALITY) if r.get("study") == STUDY}
    outcomes = [(r["artifact"], "superticket", r["seed"]) for r in records
                if r["record"] == "sweep" and r["ticket_type"] == "winning"]
    outcomes += [(artifact, r["record"], args.seeds[0]) for r in records if r["record"] in ("ticketshare", "mtl")
                 for artifact in r["tasks"].values()]
    outcomes += [(r["artifact"], f"{r['base']}+finetune", args.seeds[0]) for r in records if r["record"] == "finetune"]
    for artifact, method, seed in outcomes:
        if artifact in known:
            continue
        manifest = cli("registry", "show", artifact, "--registry", str(args.registry))["manifest"]
        metric_name = manifest["task"]["metric"]
        append(QUALITY, {
            "study": STUDY, "task": manifest["task"]["name"], "method": method, "k": None, "seed": seed,
            "level": manifest["details"].get("best_level"), "metric_name": metric_name,
            "metric": manifest["metrics"][metric_name], "metrics": manifest["metrics"],
            "trainable_params": manifest["trainable_params"], "artifact_bytes": manifest["payload_bytes"],
            "epochs": args.epochs, "lr": manifest["hyperparameters"]["lr"], "backbone": manifest["backbone"]["name"],
            "backbone_fingerprint": manifest["backbone"]["fingerprint"], "artifact": artifact})


def report(args) -> None:
    from ticketserve.core.tasks import get_task

    records = read_jsonl(RECORDS)
    _sync_quality(records, args)
    lines = ["# Super tickets and Ticket-Share on MiniLM-L6 (generated by `benchmarks/studies/supertickets.py`)", "",
             f"Bundled MiniLM-L6 (6 layers × 12 heads, 6 FFNs), real GLUE dev sets, 2 CPU cores, {args.epochs} epochs per",
             "fine-tuning. Level 0 % prunes nothing: it is plain full fine-tuning, run once per seed (in the",
             "winning sweep) and shared by the random and losing curves.", ""]
    sweeps = [r for r in records if r["record"] == "sweep"]
    best_rows = []
    for task in dict.fromkeys(r["task"] for r in sweeps):
        runs = [r for r in sweeps if r["task"] == task]
        levels = sorted({p["level"] for r in runs for p in r["levels"]})
        lines += [f"## {task}: dev {get_task(task).metric} per pruning level", "",
                  "| sweep | seed | " + " | ".join(f"{round(level * 100)} %" for level in levels) + " | best |",
                  "|---|---|" + "---|" * (len(levels) + 1)]
        for r in runs:
            at = {p["level"]: p["metric"] for p in r["levels"]}
            lines.append(f"| {r['ticket_type']} | {r['seed']} | " + " | ".join(
                f"{at[level]:.4f}" if level in at else "(shared)" for level in levels) + f" | {round(r['best_level'] * 100)} % |")
            if r["ticket_type"] == "winning" and 0 in at:
                best = max(r["levels"], key=lambda p: p["metric"])
                best_rows.append(f"| {task} | {r['seed']} | {at[0]:.4f} | {best['metric']:.4f} | {round(best['level'] * 100)} % "
                                 f"| {best['heads_pruned']} / {best['ffn_pruned']} | {best['metric'] - at[0]:+.4f} |")
        for kind in dict.fromkeys(r["ticket_type"] for r in runs):
            seeds = [{p["level"]: p["metric"] for p in r["levels"]} for r in runs if r["ticket_type"] == kind]
            if len(seeds) > 1:  # the curve over seeds: a level counts where every seed has it
                lines.append(f"| {kind} | mean of {len(seeds)} | " + " | ".join(
                    f"{sum(at[level] for at in seeds) / len(seeds):.4f}" if all(level in at for at in seeds) else "(shared)"
                    for level in levels) + " | |")
        for seed in dict.fromkeys(r["seed"] for r in runs):
            figure = RESULTS / f"phase-{task}-s{seed}.png"
            cli("ticket", "plot-phase", *[r["artifact"] for r in runs if r["seed"] == seed], "-o", str(figure),
                "--registry", str(args.registry))
            lines += ["", f"![phase transition on {task}, seed {seed}](results/{figure.name})"]
        lines.append("")
    if best_rows:
        lines += ["## Super ticket (best winning level) vs full fine-tuning (level 0, same loop and seed)", "",
                  "| task | seed | full FT | super ticket | level | heads / FFNs pruned | gain |", "|---|---|---|---|---|---|---|",
                  *best_rows, ""]
    shared = {kind: next((r for r in reversed(records) if r["record"] == kind), None) for kind in ("ticketshare", "mtl")}
    if any(shared.values()):
        tasks = list(next(r for r in shared.values() if r)["metrics"])
        tuned = {(r["base"], r["task"]): r["metrics"] for r in records if r["record"] == "finetune"}
        lines += ["## Ticket-Share vs plain multi-task learning (one shared encoder, best epoch by mean dev metric)", "",
                  "The fine-tuned columns train each task's shared encoder, head and mask further on that task",
                  "alone (full-size results, reported, not served; – = not run yet).", "",
                  "| task | metric | plain MTL | Ticket-Share | MTL, fine-tuned | Ticket-Share, fine-tuned |",
                  "|---|---|---|---|---|---|"]
        columns = [[r["metrics"][task][get_task(task).metric] if r else None for task in tasks]
                   for r in (shared["mtl"], shared["ticketshare"])]
        columns += [[tuned[(base, task)][get_task(task).metric] if (base, task) in tuned else None for task in tasks]
                    for base in ("mtl", "ticketshare")]
        for i, task in enumerate(tasks):
            lines.append(f"| {task} | {get_task(task).metric} | " + " | ".join(
                f"{column[i]:.4f}" if column[i] is not None else "–" for column in columns) + " |")
        lines.append("| average | | " + " | ".join(
            f"{sum(column) / len(column):.4f}" if None not in column else "–" for column in columns) + " |")
        lines.append("")
    discussion = HERE / "supertickets_discussion.md"
    REPORT.write_text("\n".join(lines) + "\n" + (discussion.read_text() if discussion.exists() else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="rte,mrpc,cola,sst2")
    parser.add_argument("--phase-tasks", default="rte,mrpc", help="tasks swept with every ticket type and seed")
    parser.add_argument("--seeds", default="42,43")
    parser.add_argument("--types", default="winning,random,losing")
    parser.add_argument("--levels", default="0,20,40,60", help="pruning levels in percent")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sst2-train-samples", type=int, default=8000)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at a time (each gets cores / jobs threads)")
    parser.add_argument("--data-root", type=Path, default=GLUE)
    parser.add_argument("--registry", type=Path, default=STUDY_REGISTRY)
    args = parser.parse_args()
    args.tasks, args.types, args.phase_tasks = args.tasks.split(","), args.types.split(","), args.phase_tasks.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    set_jobs(args.jobs)
    if not args.report_only:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
