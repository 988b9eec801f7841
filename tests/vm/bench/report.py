#!/usr/bin/env python3
"""The benchmark suite's report, host side: medians over the rounds, tables and ratios.

Usage: tests/vm/bench/report.py RESULTS_DIR   (tests/vm/out/bench, written by guest/bench.sh)

Reads RESULTS_DIR/fio/<round>_<target>_<mode>_<job>.json (fio's JSON output) and bench.env (the
settings the guest used), and writes
  results.json  every run's figures and the per-(mode, job, target) medians
  results.md    per mode: a table of IOPS and MiB/s per target with the ratios tcmu-warden
                `file` / tcmu-runner, `file` / fileio and `ram` / fileio; one of completion-latency
                percentiles; one of each round's IOPS (the spread between rounds)
and prints results.md. Exit status 1 when there is no fio output at all.

Figures per run: IOPS and bandwidth are read + write. Latency is fio's completion latency
(clat: from submission to the kernel until completion) in microseconds, p50/p99/p99.9, of the
job's main direction: reads for read and mixed jobs, writes for write jobs (results.json has
both directions). The median of each figure is taken on its own across the rounds.
"""

import json
import os
import statistics
import sys

TARGETS = ["fileio", "tcmu-runner", "warden-file", "warden-ram"]
TARGET_NAMES = {
    "fileio": "kernel fileio",
    "tcmu-runner": "tcmu-runner file",
    "warden-file": "warden file",
    "warden-ram": "warden ram",
}
DURABILITY = {
    "wce1": {
        "fileio": "volatile cache (buffered, fd_buffered_io=1); durable on SYNCHRONIZE CACHE",
        "tcmu-runner": "volatile cache; durable on SYNCHRONIZE CACHE (fsync)",
        "warden-file": "volatile cache; durable on SYNCHRONIZE CACHE or FUA",
        "warden-ram": "memory only, never durable",
    },
    "wce0": {
        "fileio": "durable per write (O_DSYNC)",
        "tcmu-runner": "NOT durable per write: the example handler syncs only on SYNCHRONIZE CACHE, "
        "and tells the initiator it has a write cache (WCE=1) whatever emulate_write_cache says",
        "warden-file": "durable per write",
        "warden-ram": "memory only, never durable",
    },
}
MODE_TITLES = {"wce1": "WCE=1 (volatile write cache)", "wce0": "WCE=0 (no write cache)"}
PCTS = [("p50", "50.000000"), ("p99", "99.000000"), ("p99.9", "99.900000")]


def read_env(path):
    env = {}
    try:
        with open(path) as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    env[k] = v
    except OSError:
        pass
    return env


def direction_figures(d):
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    out = {"iops": d["iops"], "bw_mib": d["bw_bytes"] / 2**20, "ios": d["total_ios"]}
    for name, key in PCTS:
        out[name + "_us"] = pct[key] / 1000 if key in pct else None
    out["mean_us"] = (d.get("clat_ns") or {}).get("mean", 0) / 1000
    return out


def parse_run(path, job):
    with open(path) as f:
        data = json.load(f)
    j = data["jobs"][0]
    r, w = direction_figures(j["read"]), direction_figures(j["write"])
    main = w if ("write" in job and "rw" not in job) else r
    run = {
        "iops": r["iops"] + w["iops"],
        "bw_mib": r["bw_mib"] + w["bw_mib"],
        "read": r,
        "write": w,
        "error": j["error"],
    }
    for name, _ in PCTS:
        run[name + "_us"] = main[name + "_us"]
    return run


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "-"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def main():
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    res = sys.argv[1]
    env = read_env(os.path.join(res, "bench.env"))
    fio_dir = os.path.join(res, "fio")
    runs = []
    for name in sorted(os.listdir(fio_dir)) if os.path.isdir(fio_dir) else []:
        if not name.endswith(".json"):
            continue
        parts = name[: -len(".json")].split("_", 3)
        if len(parts) != 4:
            continue
        rnd, target, mode, job = parts
        try:
            fig = parse_run(os.path.join(fio_dir, name), job)
        except (OSError, ValueError, KeyError, IndexError) as e:
            print(f"report: skipping {name}: {e}", file=sys.stderr)
            continue
        runs.append({"round": int(rnd), "target": target, "mode": mode, "job": job, **fig})
    if not runs:
        print("report: no fio results in " + fio_dir, file=sys.stderr)
        return 1

    # The cache type each target's disks showed the initiator, per mode (sessions.txt).
    seen_cache = {}
    try:
        with open(os.path.join(res, "sessions.txt")) as f:
            for line in f:
                p = line.split()
                if len(p) >= 4:
                    seen_cache.setdefault((p[2], p[1]), set()).add(p[3].replace("-", " "))
    except OSError:
        pass

    job_order = (env.get("JOBS", "") + " " + env.get("WCE0_JOBS", "")).split()
    jobs_seen = []
    for j in job_order + [r["job"] for r in runs]:
        if j not in jobs_seen:
            jobs_seen.append(j)
    modes = [m for m in ["wce1", "wce0"] if any(r["mode"] == m for r in runs)]
    targets = [t for t in TARGETS if any(r["target"] == t for r in runs)]

    medians = {}
    for mode in modes:
        for job in jobs_seen:
            for target in targets:
                sel = [r for r in runs if (r["mode"], r["job"], r["target"]) == (mode, job, target)]
                if not sel:
                    continue
                m = {"rounds": len(sel)}
                for k in ["iops", "bw_mib", "p50_us", "p99_us", "p99.9_us"]:
                    m[k] = median([r[k] for r in sel])
                medians.setdefault(mode, {}).setdefault(job, {})[target] = m

    def get(mode, job, target, k):
        return medians.get(mode, {}).get(job, {}).get(target, {}).get(k)

    lines = []
    rounds = env.get("ROUNDS", "?")
    lines.append(
        f"Settings: {rounds} round(s), {env.get('RUNTIME', '?')} s per job after "
        f"{env.get('RAMP', '?')} s ramp, kernel {env.get('KERNEL', '?')}, {env.get('CPUS', '?')} "
        f"vCPUs, {env.get('FIO', 'fio')}, {env.get('RUNNER', 'tcmu-runner')}, single LUN "
        f"{env.get('SIZE_MB', '?')} MiB, multi-device job {env.get('MULTI_LUNS', '?')} LUNs x "
        f"{env.get('MULTI_SIZE_MB', '?')} MiB{', QUICK (smoke) mode' if env.get('QUICK') == '1' else ''}."
    )
    lines.append("Medians over the rounds; latency is fio's completion latency (clat) in microseconds of")
    lines.append("the job's main direction (reads for read and 70/30 mixed jobs, writes for write jobs).")
    for mode in modes:
        lines.append("")
        lines.append(f"### {MODE_TITLES[mode]}")
        lines.append("")
        for t in targets:
            seen = ", ".join(sorted(seen_cache.get((mode, t), []))) or "?"
            lines.append(f"- {TARGET_NAMES[t]}: {DURABILITY[mode][t]} (initiator sees: {seen})")
        lines.append("")
        head = "| job | " + " | ".join(f"{TARGET_NAMES[t]} IOPS" for t in targets)
        head += " | " + " | ".join(f"{TARGET_NAMES[t]} MiB/s" for t in targets)
        ratios = []
        if "warden-file" in targets and "tcmu-runner" in targets:
            ratios.append(("warden-file", "tcmu-runner", "file / tcmu-runner"))
        if "warden-file" in targets and "fileio" in targets:
            ratios.append(("warden-file", "fileio", "file / fileio"))
        if "warden-ram" in targets and "fileio" in targets:
            ratios.append(("warden-ram", "fileio", "ram / fileio"))
        head += "".join(f" | {r[2]}" for r in ratios) + " |"
        lines.append(head)
        lines.append("|---" * (1 + 2 * len(targets) + len(ratios)) + "|")
        for job in jobs_seen:
            if job not in medians.get(mode, {}):
                continue
            row = f"| {job} | " + " | ".join(fmt(get(mode, job, t, "iops")) for t in targets)
            row += " | " + " | ".join(fmt(get(mode, job, t, "bw_mib"), 1) for t in targets)
            row += "".join(
                " | " + ratio(get(mode, job, a, "iops"), get(mode, job, b, "iops")) for a, b, _ in ratios
            )
            lines.append(row + " |")
        lines.append("")
        lines.append("Completion latency, microseconds (p50 / p99 / p99.9):")
        lines.append("")
        lines.append("| job | " + " | ".join(TARGET_NAMES[t] for t in targets) + " |")
        lines.append("|---" * (1 + len(targets)) + "|")
        for job in jobs_seen:
            if job not in medians.get(mode, {}):
                continue
            cells = []
            for t in targets:
                p = [get(mode, job, t, k) for k in ["p50_us", "p99_us", "p99.9_us"]]
                cells.append(" / ".join(fmt(v) for v in p) if any(v is not None for v in p) else "-")
            lines.append(f"| {job} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("IOPS of each round (round 1, 2, ...; the VM's drift and the host's load show here):")
        lines.append("")
        lines.append("| job | " + " | ".join(TARGET_NAMES[t] for t in targets) + " |")
        lines.append("|---" * (1 + len(targets)) + "|")
        for job in jobs_seen:
            if job not in medians.get(mode, {}):
                continue
            cells = []
            for t in targets:
                sel = sorted(
                    (r["round"], r["iops"])
                    for r in runs
                    if (r["mode"], r["job"], r["target"]) == (mode, job, t)
                )
                cells.append(", ".join(fmt(v) for _, v in sel) or "-")
            lines.append(f"| {job} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"

    with open(os.path.join(res, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(res, "results.json"), "w") as f:
        json.dump({"settings": env, "durability": DURABILITY,
                   "cache_type_seen": {f"{m}/{t}": sorted(v) for (m, t), v in seen_cache.items()}, "runs": runs, "medians": medians}, f, indent=1)
    print(text, end="")
    print(f"bench: {len(runs)} fio runs; {os.path.join(res, 'results.md')}, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
