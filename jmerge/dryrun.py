"""`--dry-run`: what a run would need per device, from config.json alone (no weight is read).

The command's programs are lowered from abstract params (`jax.ShapeDtypeStruct` laid out as the
real run lays them out) and compiled for the requested devices; each program's per-device bytes
come from XLA's own memory analysis of the compiled program:

    peak = arguments + temporaries + outputs - aliased (donated buffers reused as outputs)

XLA allocates the temporaries of a program as one buffer of `temp_size_in_bytes`, so this is the
most the program holds at once. `--devices N` compiles for N devices; a process that has fewer
re-executes itself once on N simulated CPU devices (before jax starts its backends), and the CPU
program stands for the accelerator's: same shapes, same shardings, XLA:CPU's fusion decisions.

Which programs a command runs is its library's business (`jmerge.dryrun_programs` asks it).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from jmerge.errors import JmergeError

# Set in the re-executed process: the parent's platform and device memory; also stops a loop.
PARENT_ENV = "JMERGE_DRY_RUN_PARENT"
GIB = 1 << 30
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
# XLA:CPU has no bfloat16 arithmetic: it widens bf16 operands to float32, and loop-invariant code
# motion then hoists the widening of a whole stacked weight out of the layer loop, a float32 copy
# of the model that a GPU or TPU compile (native bf16) never makes (measured: 8B generation 63.9
# GiB with the pass, 35.4 without). The simulated compile skips that one pass.
CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
HOST_KINDS = ("pinned_host", "unpinned_host")  # memory kinds of arguments kept off the device
# Top-level argument names of the jitted functions -> the share of memory they are.
SHARES = {"base": "model", "params": "model", "reference": "model", "tvs": "task_vectors",
          "experts": "task_vectors", "opt_state": "optimizer", "buf": "model", "base_layers": "model",
          "base_rest": "model", "expert_layers": "task_vectors", "expert_rests": "task_vectors"}


def add_flags(p, prompt_tokens: str | None = None) -> None:
    """The dry-run flags of a command; `prompt_tokens`: the help of its --prompt-tokens, if any."""
    g = p.add_argument_group("dry run (per-device memory of the compiled programs; no weight is read)")
    g.add_argument("--dry-run", action="store_true",
                   help="compile every program the run would run from config.json alone and print "
                        "each one's per-device memory and whether it fits")
    g.add_argument("--devices", type=int, metavar="N",
                   help="compile for N devices (default: this process's); simulated on N CPU devices "
                        "when there are fewer")
    g.add_argument("--device-memory", metavar="SIZE",
                   help="memory of one device, e.g. 80GB or 64GiB (default: the local device's)")
    g.add_argument("--json", action="store_true", help="the dry run's result as one JSON object on stdout")
    if prompt_tokens:
        g.add_argument("--prompt-tokens", type=int, metavar="N", help=prompt_tokens)


def wanted(a) -> bool:
    """Whether the command line asks for a dry run; the dry run's own flags need --dry-run."""
    if not a.dry_run:
        given = [f for f in ("devices", "device_memory", "json", "prompt_tokens") if getattr(a, f, None)]
        if given:
            raise JmergeError(f"--{given[0].replace('_', '-')} applies to --dry-run only")
    return a.dry_run


def parse_size(text: str) -> int:
    """'80GB' -> 80e9 bytes, '64GiB' -> 64 * 2**30; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise JmergeError(f"--device-memory {text!r}: expected a size such as 80GB or 64GiB")
    return int(float(m.group(1)) * UNITS[unit])


def size(n: int) -> str:
    """Bytes as GiB; small programs (tiny models) in MiB or KiB, so they do not read as 0."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if abs(n) >= size / 10:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


# ------------------------------------------------------------------------------------- devices

def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _device_memory(device) -> int:
    stats = device.memory_stats() if device.platform != "cpu" else None
    return int((stats or {}).get("bytes_limit") or _host_memory())


def _xla_flags(n: int) -> str:
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])


def devices(n: int | None, command: str, argv: list[str]) -> tuple[list, dict]:
    """The first n devices of this process, with {platform, memory, simulated} of the local device
    they stand for. With fewer than n, the command is run again (execve, same argv) on n CPU
    devices; that process gets the parent's platform and memory through PARENT_ENV."""
    import jax

    from jmerge import distributed
    if n is not None and n < 1:
        raise JmergeError(f"--devices {n}: must be at least 1")
    # a dry run allocates nothing on the devices: it must not take a GPU's memory from others
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    devs = jax.devices()
    parent = json.loads(os.environ.get(PARENT_ENV) or "null")
    n = len(devs) if n is None else n
    if len(devs) >= n:
        local = parent or {"platform": devs[0].platform, "memory": _device_memory(devs[0])}
        return devs[:n], dict(local, simulated=devs[0].platform == "cpu")
    if parent is not None:
        raise JmergeError(f"--devices {n}: only {len(devs)} CPU devices after re-executing with XLA_FLAGS="
                          f"{os.environ.get('XLA_FLAGS', '')!r}")
    if distributed.count() > 1:
        raise JmergeError(f"--devices {n}: this run's {distributed.count()} processes have {len(devs)} devices; "
                          f"simulate {n} devices in a single process")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=_xla_flags(n),
               **{PARENT_ENV: json.dumps({"platform": devs[0].platform, "memory": _device_memory(devs[0])})})
    progress(f"{len(devs)} {devs[0].platform} device(s) here: running again on {n} simulated CPU devices")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "jmerge", command, *argv], env)


def progress(msg: str) -> None:
    print(f"[dry-run] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ analysis

def _arg_names(lowered) -> list[str] | None:
    """The flattened argument names jax recorded while tracing ("theta['layers']", ...); None
    where this jax keeps them elsewhere."""
    info = getattr(lowered, "_lowering", None)
    info = getattr(info, "compile_args", {}).get("all_args_info")
    names = getattr(getattr(info, "debug_info", None), "arg_names", None)
    return list(names) if names else None


def argument_bytes(lowered, compiled) -> dict[str, list[tuple[str, int, str | None]]]:
    """Per top-level argument name: (leaf name, per-device bytes, memory kind) of each of its leaves."""
    import jax

    from jmerge import sharding as shd
    infos = jax.tree.leaves(lowered.args_info)
    # None: an argument the program does not use (XLA drops it)
    shardings = jax.tree.leaves(compiled.input_shardings, is_leaf=lambda x: x is None)
    names = _arg_names(lowered)
    if names is None or len(names) != len(infos):
        names = [f"arg{i}" for i in range(len(infos))]
    out: dict[str, list[tuple[str, int]]] = {}
    for name, info, sharding in zip(names, infos, shardings):
        aval = info._aval if hasattr(info, "_aval") else info
        if sharding is None or jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
            continue  # unused, or a PRNG key (a few bytes)
        top = re.split(r"[\[.]", name, maxsplit=1)[0]
        leaf = jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding)
        out.setdefault(top, []).append((name, shd.device_bytes(leaf), getattr(sharding, "memory_kind", None)))
    return out


def analyse(name: str, lowered) -> dict:
    """One program's compiled per-device memory: the fields of XLA's analysis, the peak, the
    bytes by argument and by share, and the largest argument tensor."""
    import jax
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=CPU_OPTIONS if jax.default_backend() == "cpu" else None)
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    by_arg = argument_bytes(lowered, compiled)
    host = sum(b for leaves in by_arg.values() for _, b, kind in leaves if kind in HOST_KINDS)
    # XLA:CPU counts arguments in host memory (parked models) among the device's arguments
    # (measured: jax 0.10.2); a platform that counts them apart reports them there.
    on_device = m.argument_size_in_bytes - (host if not m.host_argument_size_in_bytes else 0)
    fields = dict(arguments=on_device, temporaries=m.temp_size_in_bytes,
                  outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes, host_arguments=host)
    peak = fields["arguments"] + fields["temporaries"] + fields["outputs"] - fields["aliased"]
    by_arg = {k: [(n, b) for n, b, kind in v if kind not in HOST_KINDS] for k, v in by_arg.items()}
    shares = {"model": 0, "task_vectors": 0, "optimizer": 0, "other": 0}
    for top, leaves in by_arg.items():
        shares[SHARES.get(top, "other")] += sum(b for _, b in leaves)
    largest = max((leaf for leaves in by_arg.values() for leaf in leaves), key=lambda x: x[1], default=("", 0))
    return dict(name=name, **fields, peak=peak, shares=shares,
                by_argument={k: sum(b for _, b in v) for k, v in by_arg.items()},
                largest_tensor={"name": largest[0], "bytes": largest[1]}, compile_seconds=round(seconds, 2))


# ------------------------------------------------------------------------------------- report

COLUMNS = [("arguments", "arguments"), ("temporaries", "temporaries"), ("outputs", "outputs"),
           ("aliased", "aliased"), ("peak", "peak/device"), ("model", "model"),
           ("task_vectors", "task vectors"), ("optimizer", "optimizer")]


def table(result: dict) -> str:
    n = result["devices"]
    where = (f"simulated on {n} CPU device{'s' * (n > 1)}" if result["simulated"]
             else f"{result['devices']} {result['platform']} device(s)")
    mesh = ",".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"jmerge {result['command']} --dry-run: {where}, mesh {mesh}, device memory "
             f"{size(result['device_memory'])} ({result['device_memory_source']})"]
    lines += [f"  {note}" for note in result["notes"]]
    if result["simulated"] or result["platform"] == "cpu":
        lines.append("  compiled by XLA:CPU without while-loop invariant code motion (see CPU_OPTIONS in jmerge/dryrun.py)")
    width = max([len("program")] + [len(p["name"]) for p in result["programs"]])
    lines.append(f"{'program':<{width}}  " + "  ".join(f"{h:>12}" for _, h in COLUMNS) + "  verdict")
    for p in result["programs"]:
        cells = [p[k] if k in p else p["shares"][k] for k, _ in COLUMNS]
        lines.append(f"{p['name']:<{width}}  " + "  ".join(f"{size(c):>12}" for c in cells) + f"  {verdict(p, result)}")
    return "\n".join(lines)


def verdict(p: dict, result: dict) -> str:
    over = p["peak"] - result["device_memory"]
    return "fits" if over <= 0 else f"over by {size(over)}"


def problems(result: dict) -> list[str]:
    """One line per program that does not fit the device memory (naming a tensor that alone does not)."""
    out = []
    budget = result["device_memory"]
    for p in result["programs"]:
        if p["peak"] <= budget:
            continue
        line = (f"{result['command']} program {p['name']} needs {size(p['peak'])} per device, "
                f"{size(p['peak'] - budget)} more than the {size(budget)} of a device")
        t = p["largest_tensor"]
        if t["bytes"] > budget:
            line += f"; tensor {t['name']} alone is {size(t['bytes'])} per device"
        out.append(line)
    need = result.get("memory_need", 0)
    if need > budget:  # the in-memory merge's programs plus the merged tensors held beside them
        out.append(f"the in-memory merge needs {size(need)} per device at {result['memory_need_stage']}, "
                   f"{size(need - budget)} more than the {size(budget)} of a device")
    return out


def report(command: str, programs: dict, devs: list, local: dict, mesh, budget: int | None,
           notes: list[str] = (), as_json: bool = False, extra: dict | None = None) -> int:
    """Compile and analyse every program, print the table (or JSON), and fail (exit 2, one line
    per program) when one does not fit."""
    analysed = []
    for i, (name, lowered) in enumerate(programs.items(), 1):
        progress(f"compiling {name} ({i}/{len(programs)})")
        analysed.append(analyse(name, lowered))
    result = dict(command=command, devices=len(devs), platform=local["platform"], simulated=local["simulated"],
                  mesh=dict(mesh.shape), device_memory=budget or local["memory"],
                  device_memory_source="--device-memory" if budget else
                  f"the local {local['platform']} device's" if local["platform"] != "cpu" else "the host's RAM",
                  notes=list(notes), programs=analysed, **(extra or {}))
    bad = problems(result)
    result["fits"] = not bad
    print(json.dumps(result, indent=1) if as_json else table(result), flush=True)
    for line in bad[:-1]:
        print(f"jmerge: error: {line}", file=sys.stderr)
    if bad:
        raise JmergeError(bad[-1])
    return 0


def run(command: str, a, argv: list[str]) -> int:
    """`jmerge <command> --dry-run ...`: the programs of the run `a` (parsed flags) describes."""
    budget = parse_size(a.device_memory) if a.device_memory else None
    devs, local = devices(a.devices, command, argv)
    from jmerge import dryrun_programs
    programs, mesh, notes, extra = getattr(dryrun_programs, command)(a, devs, budget or local["memory"],
                                                                      local["platform"])
    return report(command, programs, devs, local, mesh, budget, notes, a.json, extra)
