#!/usr/bin/env python3
"""Tests of the launch tools: launch/sweep on a tiny sweep (CSV columns, PNG plots, a failing
point recorded, resume) and launch/run's --dry-run command lines.

usage: launch_tests.py RINGATTN_BINARY CASE     (CASE = one of the functions named case_*)
"""
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEP = os.path.join(ROOT, "launch", "sweep")
RUN = os.path.join(ROOT, "launch", "run")
BIN = None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ["scaling.png", "time_vs_seqlen.png", "breakdown.png", "ranks_threads.png"]


def check(cond, msg):
    if not cond:
        sys.exit(f"FAIL: {msg}")


def sweep(args):
    # The sweep tool runs under this interpreter (the one with matplotlib), not its #! line.
    p = subprocess.run([sys.executable, SWEEP] + args, capture_output=True, text=True,
                       timeout=600)
    print(p.stderr)
    print(p.stdout)
    check(p.returncode == 0, f"launch/sweep {' '.join(args)} exited {p.returncode}")
    return p


def log_lines(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return f.read().splitlines()


def read_csv(out):
    with open(os.path.join(out, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


# 2 ranks cannot split a 1-token sequence: those two points fail (exit 2 with a message).
TINY = """
bin = "{bin}"
out = "{out}"
seqlen = [64, 1]
ranks = [1, 2]
threads = [1]
layout = ["zigzag"]
causal = [true]
mode = ["pass-kv", "pass-q"]
heads = 2
dim = 16
iters = 1
timeout = 120
baselines = ["1x1", "allcore"]
"""
# Runs: baselines 1x1 and 1x2 for s = 64 and s = 1 (4), points 2 seqlens x 2 ranks x 2 modes (8).
TINY_RUNS = 12


def case_sweep_tiny():
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sweep")
        cfg = os.path.join(tmp, "tiny.toml")
        with open(cfg, "w") as f:
            f.write(TINY.format(bin=BIN, out=out))

        # An interrupted sweep: 5 runs, then a record cut short mid-write.
        sweep(["--config", cfg, "--limit", "5"])
        check(len(log_lines(out)) == 5, "5 records after --limit 5")
        check(len(read_csv(out)) == 5, "the CSV holds the 5 finished runs")
        with open(os.path.join(out, "results.jsonl"), "a") as f:
            f.write('{"key": "cut sho')

        # Resume: the 7 remaining runs only.
        p = sweep(["--config", cfg])
        check(f"5 of {TINY_RUNS} runs already" in p.stderr, "resume message")
        recs = [json.loads(l) for l in log_lines(out) if "cut sho" not in l]
        check(len(recs) == TINY_RUNS, f"{TINY_RUNS} records after the resume, got {len(recs)}")
        check(len({(r["key"], r["rep"]) for r in recs}) == TINY_RUNS, "no run done twice")
        check("left ~" in p.stderr and "elapsed" in p.stderr, "progress with the time left")

        rows = read_csv(out)
        check(len(rows) == TINY_RUNS, f"{TINY_RUNS} CSV rows, got {len(rows)}")
        cols = set(rows[0].keys())
        for c in ["key", "rep", "role", "workload", "scaling", "seqlen", "ranks", "threads",
                  "cores", "ulysses", "strategy", "layout", "causal", "mode", "heads", "kv_heads",
                  "dim", "iters", "status", "error", "rc", "wall_s", "command", "t_1x1_s",
                  "t_allcore_s", "speedup_1x1", "eff_1x1", "speedup_allcore", "eff_allcore",
                  "step_compute_ms", "step_wait_ms", "step_alltoall_ms", "step_mb",
                  # every field of the CLI's --json output
                  "time_s", "tflops", "step_compute_s", "step_wait_s", "step_bytes",
                  "max_rank_wait_s", "max_rank_compute_s", "min_rank_compute_s",
                  "kernel_calls_per_rank", "backend", "version", "total_tokens"]:
            check(c in cols, f"CSV column {c}")
        failed = [r for r in rows if r["status"] == "failed"]
        check(len(failed) == 2, f"2 failed runs, got {len(failed)}")
        for r in failed:
            check(r["ranks"] == "2" and r["seqlen"] == "1", "the failing points are 2 ranks, s=1")
            check("smaller than the number of ranks" in r["error"], f"error recorded: {r['error']}")
            check(r["rc"] == "2", "exit status recorded")
        ok = [r for r in rows if r["status"] == "ok"]
        check(len(ok) == TINY_RUNS - 2, "the other runs succeed")
        for r in ok:
            check(float(r["time_s"]) > 0, "time_s")
            check(r["command"].startswith("mpirun -np " + r["ranks"]), "the exact command")
            if r["role"] == "point":
                for c in ("eff_1x1", "eff_allcore", "speedup_1x1", "speedup_allcore"):
                    check(float(r[c]) > 0, f"{c} of {r['key']}")
                e = float(r["t_1x1_s"]) / (int(r["cores"]) * float(r["time_s"]))
                check(abs(e - float(r["eff_1x1"])) < 1e-3 * max(1.0, e), "eff_1x1 = T1/(C T)")
        for name in PLOTS:
            path = os.path.join(out, name)
            check(os.path.exists(path), f"{name} written")
            with open(path, "rb") as f:
                check(f.read(8) == PNG_MAGIC, f"{name} is a PNG")

        # Nothing left: a third call runs nothing.
        n = len(log_lines(out))
        p = sweep(["--config", cfg])
        check(len(log_lines(out)) == n, "a finished sweep runs nothing again")
        check(f"{TINY_RUNS} of {TINY_RUNS} runs already" in p.stderr, "all runs skipped")

        # The report again from the saved settings alone (as on another machine).
        os.remove(os.path.join(out, "results.csv"))
        sweep(["--out", out, "--report-only"])
        check(len(read_csv(out)) == TINY_RUNS, "--report-only rewrites the CSV")
        check(len(log_lines(out)) == n, "--report-only runs nothing")


def case_sweep_dry_run():
    # The Ulysses axis: U = 1 passes no flag (works without Ulysses support), U > 1 passes
    # --ulysses U; ranks that U does not divide are skipped. Weak scaling: seqlen = tpr x ranks.
    p = sweep(["--bin", "ringattn", "--scaling", "weak", "--tokens-per-rank", "32",
               "--ranks", "1,2,4", "--ulysses", "1,2", "--layout", "zigzag", "--causal", "false",
               "--baselines", "1x1", "--launcher=--tcp", "--dry-run"])
    lines = [l for l in p.stdout.splitlines() if l.startswith("[")]
    check(len(lines) == 3 + 5, f"3 baselines + 5 points, got {len(lines)}")
    check("skipped 1 combination" in p.stderr, "1 rank x U=2 skipped")
    for l in lines:
        ranks = int(l.split("-np ")[1].split()[0])
        check(f"--seqlen {32 * ranks} " in l or "baseline" in l, f"weak seqlen: {l}")
        check("--causal" not in l, "non-causal")
        check("--mca btl tcp,self" in l, "launcher options passed")
    uly = [l for l in lines if "--ulysses" in l]
    check(len(uly) == 2 and all("--ulysses 2" in l for l in uly), "U=2 on 2 and 4 ranks")
    check(sum("U=2" in l for l in lines) == 2, "U=2 points described")


def case_sweep_optional_fields():
    # A stand-in binary: Ulysses runs report all-to-all fields, which become CSV columns and
    # step_alltoall_ms; a run past the timeout is killed and recorded.
    fake = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_ringattn.py")
    with tempfile.TemporaryDirectory() as out:
        sweep(["--bin", fake, "--ranks", "2", "--ulysses", "1,2", "--seqlen", "64,999",
               "--baselines", "", "--timeout", "2", "--out", out])
        rows = read_csv(out)
        check("alltoall_bytes" in rows[0] and "ulysses" in rows[0], "optional JSON columns")
        by = {(r["seqlen"], r["ulysses"], r["role"]): r for r in rows}
        u2 = by[("64", "2", "point")]
        check(u2["status"] == "ok" and u2["strategy"] == "ulysses", "U = ranks: pure Ulysses")
        check(abs(float(u2["step_alltoall_ms"]) - 1e3 * float(u2["step_alltoall_s"])) < 1e-9,
              "step_alltoall_ms from step_alltoall_s")
        check(u2["alltoall_bytes"] == "4096", "all-to-all bytes")
        check("--ulysses 2" in u2["command"], "--ulysses passed")
        u1 = by[("64", "1", "point")]
        check(u1["step_alltoall_ms"] == "" and "--ulysses" not in u1["command"], "U = 1: no flag")
        slow = [r for r in rows if r["seqlen"] == "999"]
        check(len(slow) == 2 and all(r["error"] == "timeout after 2 s" for r in slow),
              "timeouts recorded")
        for name in PLOTS:
            with open(os.path.join(out, name), "rb") as f:
                check(f.read(8) == PNG_MAGIC, f"{name} is a PNG")


def case_sweep_bad_input():
    # Exit 2 with a message naming the key or flag.
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "bad.toml")
        with open(cfg, "w") as f:
            f.write("rankz = [1, 2]\n")
        for args, needle in ((["--ranks", "1,x", "--dry-run"], "ranks: expected integers"),
                             (["--causal", "maybe", "--dry-run"], "causal: expected true/false"),
                             (["--scaling", "weak", "--dry-run"], "needs tokens_per_rank"),
                             (["--cases", "zigzag", "--dry-run"], "cases: expected"),
                             (["--config", cfg, "--dry-run"], "unknown key(s) rankz"),
                             (["--bin", os.path.join(tmp, "nope"), "--out", tmp],
                              "bin: no executable")):
            p = subprocess.run([sys.executable, SWEEP] + args, capture_output=True, text=True,
                               timeout=60)
            check(p.returncode == 2 and needle in p.stderr, f"{args}: rc {p.returncode} {p.stderr}")


def run_dry(args):
    # Outside any Slurm job (under one, the launcher takes the job's machines and cores).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run([RUN, "--dry-run"] + args, capture_output=True, text=True, timeout=60,
                       env=env)
    check(p.returncode == 0, f"launch/run {' '.join(args)}: {p.stderr}")
    return p.stdout.strip()


def case_run_dry_run():
    # Hybrid 2 machines x 2 ranks x 4 threads: each rank bound to 4 cores of its machine.
    got = run_dry(["-n", "4", "-t", "4", "--hosts", "n1:8,n2:8", "--per-node", "2", "--no-root",
                   "--tcp", "--", "bin/ringattn", "ring", "--seqlen", "65536", "--threads", "4"])
    want = ("mpirun -np 4 --host n1:8,n2:8 --map-by ppr:2:node:PE=4 --bind-to core "
            "-x OMP_NUM_THREADS=4 -x OMP_PROC_BIND=close -x OMP_PLACES=cores "
            "--mca pml ob1 --mca btl tcp,self bin/ringattn ring --seqlen 65536 --threads 4")
    check(got == want, f"hybrid over hosts:\n got  {got}\n want {want}")
    # Machines of 16 cores: as many 4-thread ranks per machine as fit (4).
    got = run_dry(["-n", "8", "-t", "4", "--hosts", "n1:16,n2:16", "--cores", "16", "--no-root",
                   "--", "b"])
    want = ("mpirun -np 8 --host n1:16,n2:16 --map-by ppr:4:node:PE=4 --bind-to core "
            "-x OMP_NUM_THREADS=4 -x OMP_PROC_BIND=close -x OMP_PLACES=cores b")
    check(got == want, f"hosts with known cores:\n got  {got}\n want {want}")
    # One machine of 8 cores, 2 ranks x 4 threads.
    got = run_dry(["-n", "2", "-t", "4", "--cores", "8", "--root", "--", "a.out", "x y"])
    want = ("mpirun -np 2 --map-by slot:PE=4 --bind-to core --allow-run-as-root "
            "-x OMP_NUM_THREADS=4 -x OMP_PROC_BIND=close -x OMP_PLACES=cores a.out 'x y'")
    check(got == want, f"hybrid on one machine:\n got  {got}\n want {want}")
    # More ranks x threads than cores: oversubscribed, unbound, threads not pinned.
    got = run_dry(["-n", "4", "-t", "2", "--cores", "2", "--no-root", "--", "a.out"])
    want = ("mpirun -np 4 --map-by slot --bind-to none --oversubscribe -x OMP_NUM_THREADS=2 a.out")
    check(got == want, f"oversubscribed:\n got  {got}\n want {want}")
    # A hostfile of 2 machines x 2 cores, 6 ranks: 3 per machine, more than their cores.
    with tempfile.NamedTemporaryFile("w", suffix=".hosts") as hf:
        hf.write("# two machines\nn1 slots=2\n\nn2 slots=2\n")
        hf.flush()
        got = run_dry(["-n", "6", "--cores", "2", "--no-root", "--hostfile", hf.name, "--", "a"])
        want = (f"mpirun -np 6 --hostfile {hf.name} --map-by ppr:3:node --bind-to none "
                "--oversubscribe -x OMP_NUM_THREADS=1 a")
        check(got == want, f"hostfile, oversubscribed:\n got  {got}\n want {want}")
    # Explicit choices win.
    got = run_dry(["-n", "2", "--cores", "2", "--map-by", "numa", "--bind-to", "numa",
                   "--proc-bind", "spread",
                   "--no-root", "--mca", "btl_tcp_if_include", "eth0", "-x", "FOO=1", "--", "b"])
    want = ("mpirun -np 2 --map-by numa --bind-to numa -x OMP_NUM_THREADS=1 "
            "-x OMP_PROC_BIND=spread -x OMP_PLACES=cores --mca btl_tcp_if_include eth0 -x FOO=1 b")
    check(got == want, f"explicit:\n got  {got}\n want {want}")
    # Bad input: exit 2 naming the option.
    for args, needle in ((["-n", "0", "--", "b"], "--ranks"), (["-t", "x", "--", "b"], "--threads"),
                         (["-n", "2"], "no program"), (["--bogus", "--", "b"], "--bogus")):
        p = subprocess.run([RUN, "--dry-run"] + args, capture_output=True, text=True, timeout=60)
        check(p.returncode == 2 and needle in p.stderr, f"{args}: rc {p.returncode} {p.stderr}")


def main():
    global BIN
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    BIN = sys.argv[1]
    fn = globals().get("case_" + sys.argv[2])
    if fn is None:
        sys.exit(f"unknown case {sys.argv[2]}")
    fn()
    print("ok")


if __name__ == "__main__":
    main()
