"""`jmerge convert SRC OUT`: HF dir | .gguf | PEFT adapter (BASE+ADAPTER) -> HF dir or orbax dir."""

from __future__ import annotations

from jmerge.cli import ArgumentParser, add_output_flags

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge convert", description=__doc__)
    p.add_argument("src", help="HF model dir, .gguf file, orbax dir, adapter dir, or BASE+ADAPTER")
    p.add_argument("out", help="output directory (written to a temp dir, renamed into place)")
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format (default hf)")
    p.add_argument("--dtype", choices=DTYPES, help="cast weights (default: keep the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="HF output shard size (default 5GB)")
    p.add_argument("--base", help="base model for an adapter directory")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights")
    add_output_flags(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    from jmerge.convert import convert
    print(convert(a.src, a.out, to=a.to, dtype=a.dtype, max_shard_size=a.max_shard_size, mesh=a.mesh,
                  base=a.base, allow_nonfinite=a.allow_nonfinite, force=a.force, progress=not a.quiet))
    return 0
