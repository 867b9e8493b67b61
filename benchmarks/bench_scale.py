"""Scale-out of ``spai score`` at 100k, 1M and 10M rows: today's design against the new one, on a 3-node cluster.

Corpus: ``--images`` small squares cut from the committed photos in one folder, addressed under many URIs through
directory symlinks (``links/d00000 -> images``, ...), so a 10M-row manifest (our schema, ``_manifest.json`` and
Parquet files of :data:`ROWS_PER_FILE` rows) costs some hundred MB of Parquet and no image copies. Manifests are
cached under ``--work`` and rebuilt only when missing, so reruns are deterministic.

Cluster: a 0-CPU head and two worker nodes started with ``ray start`` on this machine, each with its own temp dir
and a small object store (``tests/test_multinode.py``'s ``ray_cluster``), stopped at the end; ``spai score`` runs
as its own driver with ``RAY_ADDRESS`` and the tiny model (seeded random ``spai_tiny`` weights).

Designs: ``today`` is a snapshot of ``--today-rev`` (``git archive`` into the work dir, run with ``PYTHONPATH`` and
cwd there, so Ray's workers import it too); ``new`` is the working tree, or ``--new-rev`` archived the same way.

Each run scores for at most ``--seconds`` / 2, is killed with SIGKILL at half the corpus (or when that time is up:
the run is then marked cut), and is resumed with the same command for at most ``--seconds`` / 2 more. Measured:

- ``rows/s``: steady rate: rows written after each run's first new part file over the time since it (start-up
  and model load left out), both runs together;
- ``first result``: seconds from the start of the command to the first part file under ``<output>.parts/``;
- ``driver peak``: peak PSS of the ``spai score`` process tree (its own Ray workers live under the raylets, so
  this is the driver alone), sampled from ``/proc``;
- ``store peak``: peak shared memory (``Pss_Shmem``) of the cluster's and the driver's processes: the object
  stores' pages in use, each counted once (Ray's own store stats need ``grpcio``, which this venv lacks); each
  job gets a fresh cluster so that the peak is its own;
- ``resume``: seconds from the restart to the first row written by the resumed run, and rows redone (rows in the
  parts beyond the distinct keys: results written twice; a finished job has removed its parts, so ``-``).
- ``rows written``: the output's rows for a finished job, else the rows in its parts.

Only ``rows/s`` of runs that reached their steady state mean anything; numbers on a machine shared with other work
are noisy (run it with ``nice``). The goal (issue #28): driver memory flat in corpus size (10M within 1.2x of
100k) and the rate per row flat.

    nice -n 19 python benchmarks/bench_scale.py --quick                      # ~1 min smoke run, the new design
    nice -n 19 python benchmarks/bench_scale.py --sizes 100000 1000000 10000000 --seconds 240
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench_score import make_corpus, make_weights, tree_memory, tree_pss
from pipelines.data.manifest import MANIFEST_SCHEMA, ROWS_PER_FILE, SCHEMA_VERSION, SIDECAR

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_multinode import ray_cluster  # noqa: E402  (the tests' own 3-node cluster, reused, not copied)

TODAY_REV = "777eb33"  # the last commit before the row-job runner: manifest on the driver, results through it
POLL_SECONDS = 1.0
PART_ROWS = 100  # small parts: the first result and the rows a kill loses show at this rate (flags after -- win)
SPAI = str(Path(sys.executable).parent / "spai")


# ---------------------------------------------------------------------------------------------------------------
# The synthetic corpus


def make_manifest(folder: Path, rows: int, images: list[Path]) -> Path:
    """A manifest of ``rows`` rows over ``images`` under ``ceil(rows / len(images))`` symlinked folders."""
    if (folder / SIDECAR).exists():
        return folder
    names = sorted(p.name for p in images)
    links = folder / "links"
    links.mkdir(parents=True, exist_ok=True)
    dirs = -(-rows // len(names))
    for k in range(dirs):
        link = links / f"d{k:06d}"
        if not link.is_symlink():
            link.symlink_to(images[0].parent)
    entries = []
    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        uris = [f"{links}/d{i // len(names):06d}/{names[i % len(names)]}" for i in range(start, min(rows, start + ROWS_PER_FILE))]
        n = len(uris)
        nulls = pa.nulls(n, pa.string())
        table = pa.Table.from_arrays(
            [pa.array(uris), pa.nulls(n, pa.int8()), pa.array(["test"] * n), nulls, pa.array(["bench_scale"] * n),
             pa.array(uris)], schema=MANIFEST_SCHEMA)
        path = f"test/part-{index:05d}-unknown.parquet"
        (folder / "test").mkdir(exist_ok=True)
        pq.write_table(table, folder / path)
        entries.append({"path": path, "split": "test", "generator": None, "rows": n})
    sidecar = {"format": "spai-manifest", "schema_version": SCHEMA_VERSION,
               "columns": {f.name: str(f.type) for f in MANIFEST_SCHEMA},
               "counts": {"rows": rows, "split": {"test": rows}, "source": {"bench_scale": rows}},
               "files": entries, "build": {"builder": "benchmarks/bench_scale.py", "notes": {}}}
    (folder / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return folder


def snapshot(rev: str, folder: Path) -> Path:
    """The tree of ``rev`` under ``folder`` (kept between runs)."""
    if not (folder / "spai_cli").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Measuring one job


@dataclasses.dataclass
class Row:
    design: str
    rows: int
    rate: float = float("nan")
    first_result: float = float("nan")
    driver_peak: int = 0
    store_peak: int = 0
    resume_first: float = float("nan")
    redone: int | None = None
    done: int = 0
    cut: bool = False
    failed: str = ""


class PartCounter:
    """Rows written so far under a job's ``<output>.parts/`` (each part's footer read once)."""

    def __init__(self, parts: Path):
        self.parts, self.seen = parts, {}

    def rows(self) -> int:
        if self.parts.is_dir():
            for path in self.parts.rglob("*.parquet"):
                if path not in self.seen:
                    try:
                        self.seen[path] = pq.read_metadata(path).num_rows
                    except (OSError, pa.ArrowInvalid):  # still being written
                        continue
        return sum(self.seen.values())


def run_job(command: list[str], env: dict, cwd: Path, log: Path, counter: PartCounter, nodes: list[int],
            seconds: float, stop_at: int, row: Row) -> tuple[list[tuple[float, int]], bool]:
    """Run ``command`` until it ends, writes ``stop_at`` rows, or ``seconds`` pass (then SIGKILL); returns the
    (time, rows) samples and whether it ended by itself. Peaks go into ``row``."""
    samples: list[tuple[float, int]] = []
    started = time.perf_counter()
    with open(log, "a") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample_memory() -> None:
            while not stop.wait(POLL_SECONDS):
                row.driver_peak = max(row.driver_peak, tree_pss(process.pid))
                row.store_peak = max(row.store_peak, tree_memory([process.pid, *nodes], "Pss_Shmem"))

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        ended = False
        while True:
            code = process.poll()
            samples.append((time.perf_counter() - started, counter.rows()))
            if code is not None:
                ended = True
                if code != 0:
                    row.failed = f"exit {code} (see {log})"
                break
            if samples[-1][1] >= stop_at or samples[-1][0] >= seconds:
                process.kill()
                process.wait()
                break
            time.sleep(POLL_SECONDS)
        stop.set()
        sampler.join()
    return samples, ended


def redone_rows(parts: Path) -> int | None:
    """Rows in the parts beyond their distinct (row, variant) keys; None when no key column is found."""
    files = sorted(parts.rglob("*.parquet"))
    if not files:
        return 0
    schema = pq.read_schema(files[0])
    keys = [c for c in ("row_id", "variant") if c in schema.names]  # the result key in both designs
    if not keys:
        return None
    table = pa.concat_tables([pq.read_table(f, columns=keys) for f in files])
    return table.num_rows - table.group_by(keys).aggregate([]).num_rows


def steady_segment(samples: list[tuple[float, int]], before: int) -> tuple[int, float]:
    """(rows, seconds) of one run after its first new part: start-up and model load left out; (0, 0) while it has
    written fewer than two parts (no rate to tell)."""
    new = [(t, n) for t, n in samples if n > before]
    return (new[-1][1] - new[0][1], new[-1][0] - new[0][0]) if new and new[-1][1] > new[0][1] else (0, 0.0)


def bench(design: str, code: Path, manifest: Path, rows: int, weights: Path, work: Path, address: str, nodes: list[int],
          seconds: float, extra: list[str]) -> Row:
    out_dir = work / "out" / f"{design}-{rows}"
    subprocess.run(["rm", "-rf", str(out_dir)], check=True)
    out_dir.mkdir(parents=True)
    output = out_dir / "scores.parquet"
    parts = Path(f"{output}.parts")
    command = [sys.executable, "-c", "import sys; from spai_cli.main import main; sys.exit(main())", "score",
               "--weights", str(weights), "--input", str(manifest), "--output", str(output), "--device", "cpu",
               "--no-mlflow", "--part-rows", str(PART_ROWS), *extra]
    # The design's code for the driver (PYTHONPATH) and for Ray's workers (the job's runtime env, which Ray merges
    # into the one the driver passes to ray.init), ahead of the editable install of the working tree.
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled",
           "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"PYTHONPATH": str(code)}}})}
    row, counter, log = Row(design, rows), PartCounter(parts), out_dir / "log.txt"
    samples, ended = run_job(command, env, code, log, counter, nodes, seconds / 2, rows // 2, row)
    at_kill, steady = counter.rows(), [steady_segment(samples, 0)]  # parts finished just before the kill count
    row.first_result = next((t for t, n in samples if n > 0), float("nan"))
    if not ended:
        row.cut = at_kill < rows // 2
        samples, ended = run_job(command, env, code, log, counter, nodes, seconds / 2, rows + 1, row)
        row.resume_first = next((t for t, n in samples if n > at_kill), float("nan"))
        row.cut = row.cut or not ended
        steady.append(steady_segment(samples, at_kill))
    done, spent = map(sum, zip(*steady))
    row.rate = done / spent if spent > 0 else float("nan")
    # a finished job compacts its parts into the output and removes them: then its output's rows are what it wrote
    row.done = pq.read_metadata(output).num_rows if ended and output.exists() else counter.rows()
    row.redone = redone_rows(parts) if parts.is_dir() else None
    return row


def format_table(rows: list[Row]) -> str:
    def mib(b: int) -> str:
        return f"{b / 2**20:.0f} MiB" if b else "-"

    def num(x: float, fmt: str = ".1f") -> str:
        return "-" if x != x else format(x, fmt)

    lines = ["| design | rows | rows/s | first result (s) | driver peak | store peak | resume to new row (s) | "
             "rows redone | rows written | note |", "|" + "---|" * 10]
    for r in sorted(rows, key=lambda r: (r.rows, r.design)):
        note = r.failed or ("cut (time budget)" if r.cut else "complete")
        lines.append(f"| {r.design} | {r.rows:,} | {num(r.rate)} | {num(r.first_result)} | {mib(r.driver_peak)} | "
                     f"{mib(r.store_peak)} | {num(r.resume_first)} | {'-' if r.redone is None else r.redone} | "
                     f"{r.done:,} | {note} |")
    base = {r.design: r for r in rows if r.rows == min(x.rows for x in rows)}
    for r in sorted(rows, key=lambda r: (r.design, r.rows)):
        b = base.get(r.design)
        if b is not None and r is not b and b.driver_peak and r.driver_peak:
            lines.append(f"\n{r.design}: driver peak at {r.rows:,} rows is {r.driver_peak / b.driver_peak:.2f}x that "
                         f"at {b.rows:,} (goal <= 1.2x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000],
                        help="manifest rows per run (default: 100k 1M 10M)")
    parser.add_argument("--designs", nargs="+", choices=("today", "new"), default=["today", "new"])
    parser.add_argument("--today-max", type=int, default=1_000_000,
                        help="largest corpus today's design is run on (it reads the whole manifest on the driver)")
    parser.add_argument("--seconds", type=float, default=240.0,
                        help="time budget per job: half before the kill, half for the resumed run (default: 240)")
    parser.add_argument("--images", type=int, default=300, help="distinct images behind the URIs (default: 300)")
    parser.add_argument("--size", type=int, default=128, help="side of the images in pixels (default: 128)")
    parser.add_argument("--today-rev", default=TODAY_REV, help=f"today's design (default: {TODAY_REV})")
    parser.add_argument("--new-rev", default=None, help="the new design's revision (default: the working tree)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"),
                        help="corpus, manifests, snapshots and outputs (kept between runs; default: /tmp/bench_scale)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 rows, the new design, 60 s per job")
    parser.add_argument("extra", nargs="*", help="KEY=VALUE or flags passed on to spai score (after --)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.designs, args.seconds, args.images = [2000], ["new"], 60.0, 50
    work = args.work.resolve()
    images = sorted((work / f"images-{args.size}").glob("img*")) or make_corpus(
        work / f"images-{args.size}", args.images, sizes=(args.size,))
    weights = work / "spai_tiny.safetensors"
    if not weights.exists():
        make_weights(weights, "spai_tiny")
    code = {"today": snapshot(args.today_rev, work / f"code-{args.today_rev}"),
            "new": snapshot(args.new_rev, work / f"code-{args.new_rev}") if args.new_rev else REPO}
    manifests = {n: make_manifest(work / f"manifest-{n}-{len(images)}", n, images) for n in args.sizes}
    results = []
    for n in args.sizes:
        for design in args.designs:
            if design == "today" and n > args.today_max:
                continue
            print(f"[bench_scale] {design} at {n:,} rows ...", flush=True)
            with ray_cluster(("node1", "node2"), work) as cluster:  # a fresh cluster: the store peak is this job's
                results.append(bench(design, code[design], manifests[n], n, weights, work, cluster.address,
                                     [p.pid for p in cluster.processes.values()], args.seconds, args.extra))
            print(format_table(results[-1:]).split("\n")[2], flush=True)
    print(f"\nspai score --device cpu, spai_tiny, {len(images)} {args.size}px images behind the URIs, 3-node cluster "
          f"on this machine, {args.seconds:.0f} s per job (half before the kill -9, half resumed)\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
