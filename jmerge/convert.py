"""One model, as `jmerge convert` reads it (HF dir | .gguf | orbax dir | PEFT adapter), written as an
HF dir or an orbax dir."""

from __future__ import annotations

import time


def convert(src, out, *, to="hf", dtype=None, max_shard_size="5GB", mesh=None, base=None,
            allow_nonfinite=False, force=False, progress=True) -> str:
    """Convert and return the one-line summary."""
    import jax.numpy as jnp

    from jmerge import sharding
    from jmerge.io import hf, load_model, orbax_io
    from jmerge.io.atomic import check_target, model_inputs

    check_target(out, force, inputs=model_inputs(src, base))  # fail before any heavy work
    t0 = time.perf_counter()
    m = load_model(src, mesh=sharding.make_mesh(mesh), dtype=dtype and jnp.dtype(dtype),
                   allow_nonfinite=allow_nonfinite, progress=progress, base=base)
    if to == "orbax":
        orbax_io.save_orbax(m.params, m.cfg, out, force=force, tokenizer_writer=m.write_tokenizer)
    else:
        hf.save_hf(m.params, m.cfg, out, max_shard_size=max_shard_size, force=force,
                   progress=progress, tokenizer_writer=m.write_tokenizer)
    n, nbytes = hf.summary(m.params)
    return (f"converted {src} -> {out} ({to}): {n / 1e6:.1f}M params, {nbytes / 1e6:.1f} MB, "
            f"{m.cfg.family}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("convert")
