"""`jmerge stats MODEL DATA.jsonl OUT`: Fisher, SNIP scores and linear-input Grams of MODEL on
prompt/response data, the files the fisher, led and regmean merge methods read."""

from __future__ import annotations

from jmerge.cli import ArgumentParser, add_output_flags, quiet_jax


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge stats", description=__doc__)
    p.add_argument("model", help="the model (HF dir, .gguf, orbax dir or BASE+ADAPTER)")
    p.add_argument("data", help="prompt/response JSONL (one {\"prompt\", \"response\"} object a line)")
    p.add_argument("out", help="output directory (written to a temp dir, renamed into place)")
    p.add_argument("--kind", default="fisher,snip,gram",
                   help="comma-separated: fisher (-> fisher.safetensors), snip (-> scores.safetensors), "
                        "gram (-> grams.safetensors); default all three")
    p.add_argument("--batch-size", type=int, default=4, help="examples per batch (default 4)")
    p.add_argument("--max-len", type=int, default=512, help="tokens kept per example (default 512)")
    p.add_argument("--batches", type=int, help="use only the first N batches of the file (default: all)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype of the model (statistics are float32 either way)")
    add_output_flags(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    quiet_jax()
    from jmerge.stats import compute
    print(compute(a.model, a.data, a.out, kinds=a.kind, batch_size=a.batch_size, max_len=a.max_len,
                  batches=a.batches, dtype=a.dtype, mesh=a.mesh, force=a.force, progress=not a.quiet))
    return 0
