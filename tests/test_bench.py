"""The benchmark still runs against the server as it is now: a change to
the server's internals once broke bench/hotpath.py's fakes unnoticed.
These check that each tool finishes and reports every job done, never how
fast (figures belong in the benchmark, not in tests)."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def run_tool(args, timeout):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_hotpath_drives_every_job_through_the_real_connection_code():
    done = run_tool([os.path.join(BENCH, "hotpath.py"), "--jobs", "3000", "--reps", "1",
                     "--window", "1000"], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr
    assert re.search(r"^3000 jobs, 32 workers .*: [0-9.]+ µs of server Python per job",
                     done.stdout, re.M), done.stdout


def test_hotpath_counts_the_bytecodes_each_server_function_runs_per_job():
    done = run_tool([os.path.join(BENCH, "hotpath.py"), "--jobs", "500", "--bytecodes"],
                    timeout=60)
    assert done.returncode == 0, done.stderr
    total = re.search(r"^(\d+) bytecodes of deputy_server per job$", done.stdout, re.M)
    assert total and int(total.group(1)) > 100, done.stdout
    assert re.search(r"^ +[0-9.]+  handle_lines \(line \d+\)$", done.stdout, re.M), done.stdout


def test_run_measures_each_deputy_scenario_with_every_job_answered(tmp_path):
    out = tmp_path / "run.json"
    done = run_tool([os.path.join(BENCH, "run.py"), "--scale", "0.02",
                     "--scenarios", "small,big,latency,depth1k,client", "--servers", "deputy",
                     "--reps", "1", "--wait-quiet", "0", "--redo-disturbed", "0",
                     "--timeout", "60", "--out", str(out)], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    measured = {run["scenario"] for run in runs}
    assert {"small", "big", "latency", "depth1k"} <= measured, measured
    for run in runs:
        if "jobs_expected" not in run:
            continue
        assert not run["timed_out"], run
        assert run["errors"] == 0 and run["bad_results"] == 0, run
        assert run["jobs_done"] == run["jobs_expected"], run
        # (/proc's stat counts in 10 ms ticks; a short run's is schedstat's)
        assert run["server_cpu_sched_us_per_job"] > 0, run
    assert "| small | deputy |" in done.stdout
