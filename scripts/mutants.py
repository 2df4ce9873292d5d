#!/usr/bin/env python3
"""Mutant check: deliberate bugs, each applied alone, that the test suite must catch.

For every mutant in `MUTANTS` the repository (git-tracked and untracked-not-ignored files) is
copied to a temporary directory, the mutant's edit is applied there (each snippet must occur
exactly once, so the table fails loudly instead of silently testing nothing when the code
moves), and `python -m pytest -x -q <its tests>` runs in the copy with this checkout's venv and
`PYTHONPATH` pointing at the copy. Before any mutant, the unmutated selections run once in a
copy: a mutant "killed" by a test that already fails proves nothing.

    .venv/bin/python scripts/mutants.py              # all mutants; exit 1 if any survives
    .venv/bin/python scripts/mutants.py --list       # the table, snippets checked, no tests run
    .venv/bin/python scripts/mutants.py --only dare_no_rescale --json out/mutants.json

Exit codes: 0 every mutant killed, 1 a mutant survived, 2 the check itself could not be trusted
(a snippet not found exactly once, the unmutated tests failing, the copy not being imported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact snippet, replacement); one bug, usually one line
    tests: tuple[str, ...]  # pytest node ids or files expected to kill it
    bug: str


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "rope_theta_doubled", "jmerge/config.py",
        (("inv = 1.0 / (self.rope_theta ** (", "inv = 1.0 / ((2 * self.rope_theta) ** ("),),
        ("tests/test_model_parity.py::test_logits_match_transformers[llama]",),
        "RoPE base theta doubled in the inverse frequencies"),
    Mutant(
        "ties_sign_unweighted", "jmerge/merge/_consensus.py",
        (("agree = agreement(weighted, elect_sign(weighted))",
          "agree = agreement(weighted, elect_sign(deltas))"),),
        ("tests/test_merge_sparse.py::test_ties_by_hand",),
        "TIES elects the sign of sum(tau_i) instead of sum(w_i tau_i)"),
    Mutant(
        "dare_no_rescale", "jmerge/merge/_sparsify.py",
        (("jnp.shape(tv))\n    out = rescale_masked(tv, keep, rescale)",
          "jnp.shape(tv))\n    out = rescale_masked(tv, keep, False)"),),
        ("tests/test_merge_sparse.py::test_dare_statistics_and_determinism",),
        "DARE drops entries but never rescales the survivors"),
    Mutant(
        "left_pad_mask_off_by_one", "jmerge/generate.py",
        (("mask[r, length - len(prompts[i]):] = 1", "mask[r, length - len(prompts[i]) - 1:] = 1"),),
        ("tests/test_generate.py::test_greedy_matches_transformers[llama]",),
        "the attention mask of a left-padded prompt also covers the pad slot before it"),
    Mutant(
        "kv_first_decode_off_by_one", "jmerge/generate.py",
        (("body, (jnp.int32(1), tok, cache, out, done))",
          'body, (jnp.int32(1), tok, dict(cache, index=cache["index"] - 1), out, done))'),),
        ("tests/test_generate.py::test_greedy_matches_transformers[llama]",),
        "the first decode step writes its K/V one slot early, over the last prompt token"),
    Mutant(
        "slerp_t_reversed", "jmerge/merge/slerp.py",
        (("return slerp_flat(t, v0, v1)", "return slerp_flat(1 - t, v0, v1)"),),
        ("tests/test_merge_geometric.py::test_slerp_endpoints_and_magnitudes",),
        "slerp interpolates with 1 - t (t=0 gives the other model)"),
    Mutant(
        "refusal_window_halved", "eval/judges.py",
        (("REFUSAL_WINDOW = 200", "REFUSAL_WINDOW = 100"),),
        ("tests/test_judges.py", "tests/test_mutant_killers.py::test_refusal_window_is_200_characters"),
        "the refusal judge looks at the first 100 characters instead of 200"),
    Mutant(
        "task_vector_reversed", "jmerge/search/merged.py",
        (("lambda e, b: e.astype(jnp.float32) - b.astype(jnp.float32)",
          "lambda e, b: b.astype(jnp.float32) - e.astype(jnp.float32)"),),
        ("tests/test_search.py::test_coefficients_formula_and_in_graph_forward",),
        "the search's task vectors are base - expert"),
    Mutant(
        "search_mask_includes_prompt", "jmerge/search/gradient.py",
        (('lm = np.pad(b["loss_mask"], pad)', 'lm = np.pad(b["attention_mask"], pad)'),),
        ("tests/test_search.py::test_mixed_batch_weights_each_type_by_its_tokens",
         "tests/test_mutant_killers.py::test_search_objective_is_response_only_ce"),
        "the search objective's token weights cover the prompt as well as the response"),
    Mutant(
        # A checkpoint that pairs theta of step n with the optimizer state of step n-1 (taken
        # before the update; the copy is needed because the step donates its input state).
        "resume_stale_opt_state", "jmerge/search/gradient.py",
        (("            theta, opt_state, loss = _step(self.theta, self.opt_state,",
          "            prev_opt = jax.tree.map(jnp.copy, self.opt_state)\n"
          "            theta, opt_state, loss = _step(self.theta, self.opt_state,"),
         ("ckpt.save(self.step, self._state())",
          "ckpt.save(self.step, dict(self._state(), opt_state=prev_opt))")),
        ("tests/test_search.py::test_resume_is_bit_identical",),
        "a resumed search restores the optimizer state of step n-1 beside theta of step n"),
)


class CheckError(Exception):
    """The check cannot be trusted (exit 2)."""


# ---- the copy ----------------------------------------------------------------------------------

def repo_files(root: Path) -> list[str]:
    r = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                       capture_output=True)
    if r.returncode:
        raise CheckError(f"{root} is not a git checkout: {r.stderr.decode(errors='replace').strip()}")
    out = r.stdout.decode()
    # A tracked file deleted in the working tree is listed but has nothing to copy.
    return [f for f in out.split("\0") if f and (root / f).is_file()]


def package_dir(root: Path) -> dict[str, str]:
    """pyproject's {package: folder} (jmerge.eval -> eval)."""
    return tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})


def package_links(root: Path) -> dict[str, str]:
    """{where the import system looks: where the files are} for packages that pyproject maps
    elsewhere (jmerge.eval -> eval/). The editable install resolves those through its own
    finder, which points at the original checkout; links in the copy make the copy's files win."""
    pkg_dir = package_dir(root)
    links = {}
    for pkg, where in pkg_dir.items():
        parent, _, leaf = pkg.rpartition(".")
        if parent and parent in pkg_dir:
            natural = f"{pkg_dir[parent]}/{leaf}"
            if Path(natural) != Path(where):
                links[natural] = where
    return links


def make_copy(root: Path, dest: Path) -> None:
    for f in repo_files(root):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)
    for natural, where in package_links(root).items():
        link = dest / natural
        if not link.exists():
            link.symlink_to(os.path.relpath(dest / where, link.parent), target_is_directory=True)


def mutated(m: Mutant, tree: Path) -> str:
    """m.file of `tree` with the mutant's edits made; each snippet must occur exactly once."""
    path = tree / m.file
    if not path.is_file():
        raise CheckError(f"{m.name}: {m.file} does not exist")
    text = path.read_text(encoding="utf-8")
    for find, replace in m.edits:
        n = text.count(find)
        if n != 1:
            raise CheckError(f"{m.name}: snippet found {n} times in {m.file} (must be exactly once): {find!r}")
        text = text.replace(find, replace)
    return text


def module_name(root: Path, file: str) -> str:
    """The dotted module a repository file is imported as (through pyproject's package-dir)."""
    pkg_dir = package_dir(root)
    p = Path(file).with_suffix("")
    for pkg, where in sorted(pkg_dir.items(), key=lambda kv: -len(Path(kv[1]).parts)):
        if p.parts[:len(Path(where).parts)] == Path(where).parts:
            rest = p.parts[len(Path(where).parts):]
            return ".".join((pkg, *rest)).removesuffix(".__init__")
    raise CheckError(f"{file} is not inside a package of pyproject.toml")


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def env_for(tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_ADDOPTS", None)
    return env


_PROBE = """
import importlib, json, os, sys
mods = sys.argv[1:]
print(json.dumps({m: os.path.realpath(importlib.import_module(m).__file__) for m in mods}))
"""


def check_imports_copy(tree: Path, modules: list[str]) -> None:
    """Every package of pyproject and `modules` must be imported from the copy, not the checkout."""
    modules = list(dict.fromkeys([*package_dir(ROOT), *modules]))
    r = subprocess.run([python(), "-c", _PROBE, *modules], cwd=tree, env=env_for(tree),
                       capture_output=True, text=True)
    if r.returncode:
        raise CheckError(f"cannot import {modules} from the copy:\n{r.stderr[-2000:]}")
    real = os.path.realpath(tree)
    for mod, f in json.loads(r.stdout.strip().splitlines()[-1]).items():
        if not f.startswith(real + os.sep):
            raise CheckError(f"{mod} was imported from {f}, not from the copy {real}")


# ---- running the tests -------------------------------------------------------------------------

_FIRST_FAIL = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)
_ERROR_LINE = re.compile(r"^E +(\S.*)$", re.M)  # pytest's explanation of a failure


@dataclasses.dataclass
class Outcome:
    rc: int | None  # None: timed out
    first_failure: str | None
    reason: str | None  # the first lines of pytest's explanation of that failure
    seconds: float
    tail: str


def run_tests(tree: Path, tests: list[str], timeout: float) -> Outcome:
    cmd = [python(), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env_for(tree), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return Outcome(None, None, None, time.perf_counter() - t0, out[-3000:])
    out = r.stdout + r.stderr
    hit, why = _FIRST_FAIL.search(out), _ERROR_LINE.findall(out)[:3]
    return Outcome(r.returncode, hit and hit.group(1), " | ".join(why)[:160] or None,
                   time.perf_counter() - t0, out[-3000:])


def in_copy(fn, mutant: Mutant | None, modules: list[str]):
    with tempfile.TemporaryDirectory(prefix="jmerge-mutant-") as tmp:
        tree = Path(tmp)
        make_copy(ROOT, tree)
        if mutant is not None:
            (tree / mutant.file).write_text(mutated(mutant, tree), encoding="utf-8")
        check_imports_copy(tree, modules)
        return fn(tree)


def selection(mutants) -> list[str]:
    return list(dict.fromkeys(t for m in mutants for t in m.tests))


def baseline(mutants, timeout: float) -> Outcome:
    mods = sorted({module_name(ROOT, m.file) for m in mutants})
    return in_copy(lambda tree: run_tests(tree, selection(mutants), timeout), None, mods)


def run_mutant(m: Mutant, timeout: float) -> dict:
    out = in_copy(lambda tree: run_tests(tree, list(m.tests), timeout), m, [module_name(ROOT, m.file)])
    if out.rc is None:
        status = "killed (timeout)"
    elif out.rc == 0:
        status = "SURVIVED"
    elif out.rc in (1, 2):  # failures, or an error while collecting the mutated code
        status = "killed"
    else:  # 5: nothing collected, 3/4: pytest itself broke — the selection, not the code
        raise CheckError(f"{m.name}: pytest exit {out.rc} (the test selection is broken?)\n{out.tail}")
    return dict(name=m.name, file=m.file, bug=m.bug, tests=list(m.tests), status=status,
                killed_by=out.first_failure, reason=out.reason, rc=out.rc, seconds=round(out.seconds, 1),
                tail=out.tail if status == "SURVIVED" else None)


def print_table(rows: list[dict]) -> None:
    w = max(len(r["name"]) for r in rows)
    print(f"{'mutant':<{w}}  {'result':<16}  {'s':>6}  killing test")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['status']:<16}  {r['seconds']:>6.1f}  {r['killed_by'] or '-'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", metavar="NAME", help="run this mutant only (repeatable)")
    p.add_argument("--list", action="store_true", help="print the mutants, check their snippets, run nothing")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.add_argument("--timeout", type=float, default=600, help="seconds per pytest run (default 600)")
    a = p.parse_args(argv)

    names = [m.name for m in MUTANTS]
    unknown = sorted(set(a.only or ()) - set(names))
    if unknown:
        print(f"mutants: unknown mutant(s) {', '.join(unknown)}; known: {', '.join(names)}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    t0 = time.perf_counter()
    try:
        for m in chosen:  # every snippet checked before any test runs
            mutated(m, ROOT)
        if a.list:
            for m in chosen:
                print(f"{m.name}: {m.file}: {m.bug}\n    tests: {' '.join(m.tests)}")
            return 0
        print(f"baseline: {len(selection(chosen))} test selections, unmutated ...", flush=True)
        base = baseline(chosen, a.timeout)
        if base.rc != 0:
            print(f"mutants: the unmutated tests do not pass (pytest exit {base.rc}, "
                  f"first failure {base.first_failure}); no mutant can be judged\n{base.tail}", file=sys.stderr)
            return 2
        print(f"baseline passes ({base.seconds:.0f} s)", flush=True)
        rows = []
        for m in chosen:
            print(f"mutant {m.name} ...", flush=True)
            rows.append(run_mutant(m, a.timeout))
            r = rows[-1]
            print(f"    {r['status']} by {r['killed_by']} ({r['seconds']} s): {r['reason']}", flush=True)
    except CheckError as e:
        print(f"mutants: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    print()
    print_table(rows)
    survived = [r for r in rows if r["status"] == "SURVIVED"]
    print(f"\n{len(rows) - len(survived)}/{len(rows)} killed in {total:.0f} s (baseline {base.seconds:.0f} s)")
    for r in survived:
        print(f"\n{r['name']} survived {' '.join(r['tests'])}:\n{r['tail']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(dict(seconds=round(total, 1), baseline_seconds=round(base.seconds, 1),
                                                mutants=rows), indent=2) + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
