"""A prompt set's responses from one model, as JSONL records (`jmerge generate`)."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Sequence

from jmerge.generate import (Completion, Generator, Sampling, default_eos_ids, load_tokenizer,
                             require_chat_template, tokenizer_home)


def write_responses(model: str, prompts: str, out: str | None = None, *, sampling: Sampling = Sampling(),
                    field: str | None = None, limit: int | None = None, max_new_tokens: int = 256,
                    batch_size: int = 16, mesh: str | None = None, dtype: str | None = None,
                    stop: Sequence[str] = (), system: str | None = None, chat_template_file=None,
                    chat_template: bool = True, force: bool = False) -> list[Completion]:
    """Generate a response to each prompt of `prompts` (a file or built-in source) and write
    `{id, prompt, response, tokens, finish_reason[, category]}` per line to `out` (atomically;
    stdout when None). Everything that can fail without weights fails before they are read."""
    from jmerge import distributed, sharding as shd
    from jmerge.eval.prompts import load_prompts
    from jmerge.io import load_model, split_adapter
    from jmerge.io.atomic import atomic_file, check_target, model_inputs

    inputs = [*model_inputs(model), prompts, chat_template_file]
    if out:  # before the weights are read and the responses generated
        check_target(out, force, inputs, kind="file")
    distributed.check_same_files([prompts, chat_template_file])  # the data, not the model
    items = load_prompts(prompts, field=field)[:limit]
    mesh = shd.make_mesh(mesh)
    tok = load_tokenizer(tokenizer_home(model), None, chat_template_file)
    if chat_template:
        require_chat_template(tok)
    loaded = load_model(model, mesh=mesh, dtype=dtype, progress=True)
    gen = Generator(loaded.cfg, loaded.params, mesh=mesh, tokenizer=tok, max_new_tokens=max_new_tokens,
                    sampling=sampling, batch_size=batch_size,
                    eos_ids=default_eos_ids(loaded.cfg, tok, split_adapter(model)[0]), stop=stop,
                    chat_template=chat_template, system=system, progress=True)
    results = gen.generate([q.text for q in items])

    with (atomic_file(out, force, inputs) if out else contextlib.nullcontext(sys.stdout)) as f:
        for q, c in zip(items, results):
            rec = dict(id=q.id, prompt=c.prompt, response=c.response, tokens=c.tokens,
                       finish_reason=c.finish_reason)
            if q.category is not None:
                rec["category"] = q.category
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return results
