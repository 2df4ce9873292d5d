"""`jmerge convert SRC OUT`: HF dir | .gguf | PEFT adapter (BASE+ADAPTER) -> HF dir or orbax dir."""

from __future__ import annotations

import time

from jmerge.cli import ArgumentParser, leave, run

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge convert", description=__doc__)
    p.add_argument("src", help="HF model dir, .gguf file, orbax dir, adapter dir, or BASE+ADAPTER")
    p.add_argument("out", help="output directory (written to a temp dir, renamed into place)")
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    p.add_argument("--dtype", choices=DTYPES, help="cast weights (default: keep the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB)")
    p.add_argument("--mesh", help="device mesh, e.g. fsdp=4,tensor=2 (default: all devices on fsdp)")
    p.add_argument("--base", help="base model for an adapter directory")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    p.add_argument("--force", action="store_true",
                   help="replace OUT if it exists (never an input, nor a folder holding one)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


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


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    print(convert(a.src, a.out, to=a.to, dtype=a.dtype, max_shard_size=a.max_shard_size, mesh=a.mesh,
                  base=a.base, allow_nonfinite=a.allow_nonfinite, force=a.force, progress=not a.quiet))
    return 0


if __name__ == "__main__":
    leave(run(main))
