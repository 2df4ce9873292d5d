"""`jmerge extract-lora MODEL BASE OUT --rank r`: MODEL − BASE as a PEFT LoRA adapter (truncated SVD)."""

from __future__ import annotations

from jmerge.cli import ArgumentParser, add_output_flags, quiet_jax


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="jmerge extract-lora", description=__doc__)
    p.add_argument("model", help="the fine-tuned model (HF dir, .gguf, orbax dir or BASE+ADAPTER)")
    p.add_argument("base", help="the model it was tuned from")
    p.add_argument("out", help="output adapter directory (written to a temp dir, renamed into place)")
    p.add_argument("--rank", type=int, required=True, help="LoRA rank r (1 .. min(out, in) of every module)")
    p.add_argument("--modules", help="comma-separated linear names, e.g. q_proj,v_proj (default: every "
                                     "attention and MLP projection; embeddings, lm_head and norms never)")
    add_output_flags(p)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    quiet_jax()
    from jmerge.lora_extract import extract_lora
    modules = [x.strip() for x in a.modules.split(",") if x.strip()] if a.modules else None
    print(extract_lora(a.model, a.base, a.out, rank=a.rank, modules=modules, mesh=a.mesh, force=a.force,
                       progress=not a.quiet))
    return 0
