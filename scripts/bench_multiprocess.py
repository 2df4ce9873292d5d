"""`jmerge merge --stream` as 2 local processes against 1, and the host memory of an HF export.

    python scripts/bench_multiprocess.py [--sizes 135m 1b] [--method ties] [--max-shard-size 100MB]
                                         [--reps 1] [--export]

Inputs: the bf16 families scripts/bench_merge.py builds (base + 2 noisy variants of SmolLM2-135M
or of a random 1.1B Llama, under $JMERGE_CACHE/bench). Every run is a fresh CPU process with one
device (the stream merge is host work); two processes meet through a local coordinator
(JMERGE_COORDINATOR, gloo), each merging the whole output files `hf.deal_shards` gives it. Wall
time is from the launch to the last process's exit, after one untimed run of each that fills
the compile cache (--cold: none is used); the two outputs are compared byte for byte. jax writes
persistent cache entries from process 0 only, and keys CPU programs by device, so the other
processes compile their programs on every run: --cold compares like with like. A file is the unit of the split,
so the shard size is small enough to give each process several.

--export also measures the HF export of the 1.1B base (`hf.save_hf` of params loaded on a
mesh over every process's devices): per process, the peak resident set during the export
minus the resident set before it (VmHWM after resetting it through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge  # noqa: E402  (the input builders and the method configs)

PY = sys.executable


def _env(n: int, i: int, port: int) -> dict:
    keep = ("JMERGE_CACHE", "JMERGE_NO_COMPILE_CACHE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JMERGE_") or k in keep}
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    if n > 1:
        env.update(JMERGE_COORDINATOR=f"127.0.0.1:{port}", JMERGE_NUM_PROCESSES=str(n), JMERGE_PROCESS_ID=str(i))
    return env


def launch(argv: list[str], n: int, logs: Path) -> float:
    """Wall seconds of `argv` run as n processes (all must succeed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        with open(logs / f"p{i}.log", "w") as f:
            procs.append(subprocess.Popen(argv, env=_env(n, i, port), stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        tails = "\n".join((logs / f"p{i}.log").read_text()[-2000:] for i in range(n))
        raise SystemExit(f"{argv} as {n} processes failed ({codes}):\n{tails}")
    return wall


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def bench_merge_split(size: str, method: str, shard: str, reps: int, work: Path) -> None:
    from jmerge.default_model import cache_root
    root = cache_root() / "bench"
    paths = bench_merge.smollm2_inputs(root) if size == "135m" else bench_merge.llama_1b_inputs(root)
    for p in paths.values():  # the page cache warm, as bench_merge.py does
        for f in p.glob("*.safetensors"):
            f.read_bytes()
    cfg = work / f"{size}-{method}.yml"
    cfg.write_text(bench_merge.CONFIGS[method].format(**{k: str(v) for k, v in paths.items()}))
    walls, outs = {}, {}
    for n in (1, 2):
        out = outs[n] = work / f"{size}-{method}-{n}p"
        argv = [PY, "-m", "jmerge", "merge", str(cfg), str(out), "--stream", "--force", "-q",
                "--max-shard-size", shard]
        launch(argv, n, work)  # fills the compile cache
        times = sorted(launch(argv, n, work) for _ in range(reps))
        walls[n] = times[len(times) // 2]
    files = len(list(outs[1].glob("*.safetensors")))
    same = same_tree(outs[1], outs[2])
    print(f"{size} {method} stream, {files} files of <= {shard}: 1 process {walls[1]:.1f} s, 2 processes "
          f"{walls[2]:.1f} s ({walls[1] / walls[2]:.2f}x), outputs byte-identical: {same}", flush=True)


def bench_export(work: Path) -> None:
    from jmerge.default_model import cache_root
    src = bench_merge.llama_1b_inputs(cache_root() / "bench")["base"]
    for n in (1, 2):
        report = work / f"export-{n}p"
        shutil.rmtree(report, ignore_errors=True)
        report.mkdir()
        wall = launch([PY, __file__, "--export-worker", str(src), str(work / f"export-{n}p-out"), str(report)],
                      n, work)
        rows = [json.loads(f.read_text()) for f in sorted(report.glob("*.json"))]
        said = "; ".join(f"process {r['process']}: {r['delta_mb']:.0f} MB over {r['before_mb']:.0f} MB, "
                         f"export {r['seconds']:.1f} s" for r in rows)
        print(f"HF export of the 1.1B base, {n} process{'es' if n > 1 else ''} ({wall:.1f} s in all; "
              f"largest tensor {rows[0]['largest_mb']:.0f} MB): {said}", flush=True)


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def export_worker(src: str, out: str, report: str) -> None:
    """One process of an export: load `src` onto a mesh over every device, then time and
    measure `hf.save_hf` alone."""
    from jmerge import distributed
    distributed.start()
    import jax
    import numpy as np

    from jmerge import sharding as shd
    from jmerge.io import hf, load_model
    mesh = shd.make_mesh({"data": 1, "fsdp": jax.device_count(), "tensor": 1})
    m = load_model(src, mesh=mesh)
    jax.block_until_ready(m.params)
    itemsize = np.dtype(jax.tree.leaves(m.params)[0].dtype).itemsize
    largest = max(int(np.prod(s)) * itemsize for s in hf.hf_layout(m.cfg).values()) / 2 ** 20
    distributed.barrier("loaded")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    hf.save_hf(m.params, m.cfg, out, force=True)
    seconds = time.perf_counter() - t0
    delta = _status_mb("VmHWM") - before
    i = distributed.index()
    (Path(report) / f"{i}.json").write_text(json.dumps(
        dict(process=i, before_mb=before, delta_mb=delta, seconds=seconds, largest_mb=largest)))
    distributed.finish()


def main() -> None:
    if sys.argv[1:2] == ["--export-worker"]:
        export_worker(*sys.argv[2:5])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["135m", "1b"], choices=["135m", "1b"])
    ap.add_argument("--method", default="ties", choices=list(bench_merge.CONFIGS))
    ap.add_argument("--max-shard-size", default="100MB")
    ap.add_argument("--reps", type=int, default=1, help="timed runs of each; the median is reported")
    ap.add_argument("--export", action="store_true", help="also measure the 1.1B HF export's host memory")
    ap.add_argument("--cold", action="store_true", help="no persistent compile cache (every run compiles)")
    args = ap.parse_args()
    if args.cold:
        os.environ["JMERGE_NO_COMPILE_CACHE"] = "1"
    from jmerge.default_model import cache_root
    work = cache_root() / "bench" / "multiprocess-runs"
    work.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        bench_merge_split(size, args.method, args.max_shard_size, args.reps, work)
    if args.export:
        bench_export(work)


if __name__ == "__main__":
    main()
