"""Start-up cost of `clpipe dicom flywheel_sync -engine native -submit`: how long until its
first request reaches the server, its CPU time, and what each of its processes imports.

    .venv/bin/python bench/startup.py                              # 15 no-op runs, prints the table
    .venv/bin/python bench/startup.py --clpipe-src /tmp/old/src    # the same with another tree's clpipe
    .venv/bin/python bench/startup.py --before /tmp/old/src --save # both trees, alternating; writes results/startup.md

A run is a no-op re-sync of a 2-file project served by the Flywheel test server in this
process (no delay), so nearly all of it is start-up. The command runs as two interpreters:
the command line (validates the config, writes the plan) replaces itself (`exec`) with the
job (`clpipe _run_plan`), which makes the requests. Imports per process come from
`PYTHONPROFILEIMPORTTIME=1` (what `python -X importtime` prints; the environment variable
also reaches the exec'd job).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import machine

from clpipe.testing import fwserver

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "startup.md"
fwserver._Handler.disable_nagle_algorithm = True  # as flywheel_sync.py: the server adds no wait


def imports(stderr: str) -> list[tuple[int, int]]:
    """(modules, microseconds of top-level imports) per interpreter, from -X importtime output."""
    out: list[tuple[int, int]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        if name.strip() == "encodings" and not name.startswith("  ") or not out:
            out.append((0, 0))
        count, total = out[-1]
        top = len(name) - len(name.lstrip()) == 1
        out[-1] = (count + 1, total + (int(cumulative) if top else 0))
    return [p for p in out if p[0] > 20]  # the tiny ones: interpreters that only exec'd


def measure(runs: int, src: str | None) -> dict:
    project = fwserver.make_demo_project(subjects=1, sessions=1, acquisitions=1, slices=2)
    first, whole, cpu = [], [], []
    with tempfile.TemporaryDirectory() as tmp, fwserver.FlywheelTestServer([project], api_keys={"k"}) as srv:
        home = Path(tmp)
        (home / ".config" / "flywheel").mkdir(parents=True)
        (home / ".config" / "flywheel" / "user.json").write_text(json.dumps({"key": srv.login_key("k"), "root": False}))
        env = dict(os.environ, HOME=str(home), FLYWHEEL_USER_HOME=str(home), PYTHONWARNINGS="ignore")
        if src:
            env["PYTHONPATH"] = src
        setup = [sys.executable, "-m", "clpipe", "project_setup", "-project_title", "x", "-project_dir", str(home / "p")]
        subprocess.run([*setup, "-source_url", "fw://lab/study/"], env=env, check=True, capture_output=True, timeout=120)
        config = home / "p" / "clpipe_config.json"
        command = [sys.executable, "-m", "clpipe", "dicom", "flywheel_sync", "-c", str(config), "-engine", "native", "-submit"]
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)  # the full sync: the rest are no-ops
        stamps: list[float] = []
        check = srv._auth_ok

        def stamped(header: str | None) -> bool:
            stamps.append(time.perf_counter())
            return check(header)

        srv._auth_ok = stamped  # type: ignore[method-assign]
        for _ in range(runs):
            stamps.clear()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=120)
            whole.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            first.append(stamps[0] - start)
        proc = subprocess.run(command, env=dict(env, PYTHONPROFILEIMPORTTIME="1"), capture_output=True, text=True, timeout=120)
    return {"first": first, "whole": whole, "cpu": cpu, "imports": imports(proc.stderr)}


def row(name: str, m: dict) -> str:
    med = statistics.median
    procs = "; ".join(f"{n} modules, {us / 1000:.0f} ms" for n, us in m["imports"])
    return (
        f"| {name} | {med(m['first']):.3f} (min {min(m['first']):.3f}) | {med(m['whole']):.3f} | "
        f"{med(m['cpu']):.3f} (min {min(m['cpu']):.3f}) | {procs} |"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=15, help="no-op runs per tree and round (default 15)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds with --before (default 1)")
    ap.add_argument("--clpipe-src", help="run the clpipe package in this folder (a src/ folder) instead of the installed one")
    ap.add_argument("--before", help="also measure this src/ folder, alternating with the installed clpipe")
    ap.add_argument("--save", action="store_true", help=f"write the table to {RESULTS.relative_to(BENCH.parent)}")
    args = ap.parse_args(argv)
    trees = [("before", args.before), ("after", args.clpipe_src)] if args.before else [("clpipe", args.clpipe_src)]
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, src in trees:
            m = measure(args.runs, src)
            seen = results.setdefault(name, {"first": [], "whole": [], "cpu": [], "imports": []})
            for key in ("first", "whole", "cpu"):
                seen[key] += m[key]
            seen["imports"] = m["imports"]
    text = "\n".join(
        [
            "# start-up of `clpipe dicom flywheel_sync -engine native -submit` (a no-op re-sync)",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}; load average {os.getloadavg()[0]:.1f}",
            f"- {args.runs} runs per tree and round, {args.rounds} round(s)" + (", the trees alternating" if args.before else ""),
            "- seconds: median (and min); CPU: user + system of both processes; imports: per process (the command line, then "
            "the job it exec's), modules and the sum of top-level import times of one run with `PYTHONPROFILEIMPORTTIME=1`",
            "",
            "| tree | first request after (s) | whole run (s) | CPU (s) | imports |",
            "| --- | ---: | ---: | ---: | --- |",
            *(row(name, m) for name, m in results.items()),
            "",
        ]
    )
    print(text)
    if args.save:
        RESULTS.write_text(text)
        print(f"saved to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
