"""Benchmark `clpipe dicom flywheel_sync` over a simulated WAN: the native engine against the
real `fw sync` and raw-download floors, with the Flywheel test server answering every request
after a fixed delay (default 40 ms), on two projects:

- (a) the main project of flywheel_sync.py: 200 zipped series (10,000 DICOM files);
- (b) 20,000 single (not zipped) DICOM files in 20 sessions, as many sites store them.

    .venv/bin/python bench/flywheel_wan.py            # full run, writes bench/results/flywheel_wan.md
    .venv/bin/python bench/flywheel_wan.py --skip-fw  # without fw sync (the slow peer)
    .venv/bin/python bench/flywheel_wan.py --quick    # tiny projects, every path, nothing saved

Every peer runs as a subprocess into a fresh dropoff, checked afterwards (flywheel_sync.py's
checks). bench/README.md explains the rows and the goals.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import flywheel_sync as fs
from benchlib import isolated_env, machine

from clpipe.testing import fwserver

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "flywheel_wan.md"
SIZES = {
    "full": {
        "study": fs.SIZES["full"]["main"],
        "singles": dict(subjects=4, sessions=5, acquisitions=10, slices=100, zipped=False),
    },
    "quick": {
        "study": fs.SIZES["quick"]["main"],
        "singles": dict(subjects=1, sessions=2, acquisitions=2, slices=20, zipped=False),
    },
}


def goals(runs: dict[str, fs.Run]) -> list[tuple[str, str, str, str]]:
    def row(what, a, b, fmt, target, met):
        bad = [f"{n}: {runs[n].status if n in runs else 'not run'}" for n in (a, b) if n not in runs or not runs[n].ok]
        if bad:
            return what, "n/a", target, "n/a (" + "; ".join(x[:80] for x in bad) + ")"
        value = runs[a].seconds / runs[b].seconds
        return what, fmt.format(value), target, "met" if met(value) else "NOT met"

    return [
        row("(a) zipped: native time / floor time", "native (a) full", "floor (a) full", "{:.2f}", "<= 1.3", lambda v: v <= 1.3),
        row(
            "(b) singles: 4-thread per-file download time / native time",
            "floor (b) full",
            "native (b) full",
            "{:.1f}x",
            ">= 10x",
            lambda v: v >= 10,
        ),
        row("(a) zipped: fw sync time / native time (no goal)", "fw (a) full", "native (a) full", "{:.1f}x", "-", lambda v: True),
        row("(b) singles: fw sync time / native time (no goal)", "fw (b) full", "native (b) full", "{:.1f}x", "-", lambda v: True),
    ]


def table(runs: list[fs.Run], header: list[str]) -> str:
    text = fs.table(runs, header)
    # flywheel_sync's own goals do not apply here: replace them with this benchmark's
    text = text[: text.index("| goal | value |")]
    out = ["| goal | value | target | verdict |", "| --- | ---: | --- | --- |"]
    out += [f"| {' | '.join(g)} |" for g in goals({r.name: r for r in runs})]
    return text + "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny projects, results not saved")
    ap.add_argument("--skip-fw", action="store_true", help="leave fw sync out")
    ap.add_argument("--latency-ms", type=float, default=40.0, help="the server's delay before every answer (default 40)")
    ap.add_argument("--bandwidth-mbps", type=float, default=0.0, help="cap the server's answers at this many Mbit/s (default: none)")
    ap.add_argument("--fw", type=Path, default=Path(os.environ.get("CLPIPE_TEST_FW", fs.DEFAULT_FW)), help="the fw command (18.5.1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    ap.add_argument("--workdir", type=Path, help="where dropoffs go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    args = ap.parse_args(argv)
    if not args.skip_fw and not args.fw.exists():
        ap.error(f"fw not found at {args.fw} (run scripts/setup.sh, pass --fw, or --skip-fw)")
    sizes = SIZES["quick" if args.quick else "full"]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="clpipe-bench-wan-", dir=args.workdir))
    home = work / "home"
    env = isolated_env(home, args.fw)
    runs: list[fs.Run] = []
    try:
        t0 = time.perf_counter()
        projects = {label: fs.load_project(label, sizes[label]) for label in ("study", "singles")}
        print(f"projects ready in {time.perf_counter() - t0:.1f} s; work folder {work}")
        header = [
            f"# flywheel_wan benchmark{' (--quick)' if args.quick else ''}",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
            f"- network: the test server sleeps {args.latency_ms:g} ms before every answer"
            + (f", answers capped at {args.bandwidth_mbps:g} Mbit/s in all" if args.bandwidth_mbps else ", no bandwidth cap")
            + " (FlywheelTestServer.link; loopback)",
            f"- (a): {fs.describe('study', sizes['study'], projects['study'][1], projects['study'][0])}",
            f"- (b): {fs.describe('singles', sizes['singles'], projects['singles'][1], projects['singles'][0])}",
        ]
        server = fwserver.FlywheelTestServer(
            [p for p, _ in projects.values()], api_keys={fs.KEY}, latency=args.latency_ms / 1000, bandwidth=args.bandwidth_mbps * 1e6 / 8
        )
        with server as srv:
            if not args.skip_fw:
                login = subprocess.run([str(args.fw), "login", srv.login_key(fs.KEY)], env=env, capture_output=True, text=True, timeout=120)
                if login.returncode != 0:
                    raise SystemExit(f"fw login failed:\n{login.stdout}{login.stderr}")
            else:  # the saved login the native engine reads, as fw login writes it
                (home / ".config" / "flywheel").mkdir(parents=True, exist_ok=True)
                (home / ".config" / "flywheel" / "user.json").write_text(f'{{"key": "{srv.login_key(fs.KEY)}", "root": false}}')
            for tag, label in (("(a)", "study"), ("(b)", "singles")):
                project, expected = projects[label]
                source = f"fw://{project.group}/{project.label}/"
                print(f"{tag} {label}: {len(expected):,} files")
                if args.skip_fw:
                    runs.append(fs.Run(f"fw {tag} full", len(expected), status="skipped (--skip-fw)"))
                else:
                    dest, tmp = work / f"dropoff-fw-{label}", work / f"fw-tmp-{label}"
                    tmp.mkdir()
                    runs += fs.sync_pair(
                        "fw",
                        lambda: fs.fw_command(args.fw, source, dest, tmp),  # noqa: B023 (called at once)
                        dest,
                        expected,
                        env,
                        work,
                        args.timeout,
                        srv,
                        noop=False,
                        label=f"{tag} ",
                    )
                runs += fs.run_native(work, project, expected, env, args.timeout, srv, f"{tag} ")
                dest = work / f"dropoff-floor-{label}"
                runs += fs.sync_pair(
                    "floor",
                    lambda: fs.floor_command(srv.base_url, project.id, dest),  # noqa: B023
                    dest,
                    expected,
                    dict(env, FLOOR_API_KEY=fs.KEY),
                    work,
                    args.timeout,
                    srv,
                    noop=False,
                    label=f"{tag} ",
                )
        header += [
            f"- peers: fw = flywheel-cli {fs.fw_version(args.fw) if args.fw.exists() else '(not run)'} `fw sync -j {fs.JOBS}`; "
            f"native = `{' '.join(fs.native_command(Path('CONFIG'))[1:])}` (its default concurrency); "
            f"floor = `flywheel_sync.py --floor`: one listing, then {fs.JOBS} threads GET every file (and unzip (a)'s zips in memory): "
            "for (b) that is the 4-thread per-file download",
            "- peak RSS: max over time (50 ms samples) of the summed RSS of the process tree; MB = 10^6 bytes",
        ]
        text = table(runs, header)
        print("\n" + text)
        if not args.quick:
            benchlib.save_results(RESULTS, text)
        return 0
    finally:
        benchlib.leave(work, args.keep)


if __name__ == "__main__":
    sys.exit(main())
