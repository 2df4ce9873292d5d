"""NaN/Inf in a merge: flagged inside the per-tensor program (inputs and output in one read), then
refused with every offender named, or, under --allow-nonfinite, kept as a warning."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

from jmerge.engine.prepare import Prepared
from jmerge.errors import JmergeError, collect


def all_finite(xs: list) -> jax.Array:
    """[whether xs[i] has no NaN/Inf], in one read of all the inputs (separate `all` reductions
    are ~10x slower on XLA:CPU: 84 ms against 6 ms for three 28M-entry bf16 tensors)."""
    from jmerge.merge._sparsify import reduce_each
    xs = [jnp.asarray(x) for x in xs]
    if len({x.shape for x in xs}) != 1:
        return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])
    return jnp.stack(reduce_each([jnp.isfinite(x) for x in xs], True, operator.and_, tuple(range(xs[0].ndim))))


def refuse_nonfinite_inputs(p: Prepared, bad: list[str]) -> None:
    """Refuse NaN/Inf inputs, listing them all, or (allowed) note them as a warning."""
    if not bad:
        return
    if not p.allow_nonfinite:
        collect([f"{b} has NaN/Inf values" for b in bad],
                "non-finite input weights (pass --allow-nonfinite to merge anyway); nothing was written")
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    p.warnings.append(f"input {bad[0]}{more} has NaN/Inf values (merged: --allow-nonfinite)")


def refuse_nonfinite_output(p: Prepared, names: list[str]) -> None:
    """Refuse a merge whose result overflowed to NaN/Inf, or (allowed) note it as a warning."""
    if not names:
        return
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    if not p.allow_nonfinite:
        raise JmergeError(f"the merged {names[0]}{more} has NaN/Inf values (pass --allow-nonfinite "
                          "to write it anyway); nothing was written")
    p.warnings.append(f"the merged {names[0]}{more} has NaN/Inf values (written: --allow-nonfinite)")


def refuse_nonfinite(p: Prepared, found: list[dict]) -> None:
    """What one process streaming the whole merge says about the non-finite tensors that all the
    processes found (each: {"inputs": [[position in HF order, "model: tensor"], ...], "outputs":
    [[position, tensor], ...]}): the first non-finite output alone when no non-finite input comes
    at or before it (where that process stops), otherwise every input, then every output."""
    ins = sorted((tuple(x) for f in found for x in f["inputs"]), key=lambda x: x[0])
    outs = sorted(tuple(x) for f in found for x in f["outputs"])
    if outs and not p.allow_nonfinite and not any(pos <= outs[0][0] for pos, _ in ins):
        refuse_nonfinite_output(p, [outs[0][1]])
    refuse_nonfinite_inputs(p, [b for _, b in ins])
    refuse_nonfinite_output(p, [n for _, n in outs])


def flag_rows(flags) -> tuple[np.ndarray, bool]:
    """(finiteness of each input, of the output) from per_tensor's flags."""
    flags = np.asarray(flags)
    return flags[:-1], bool(flags[-1])
