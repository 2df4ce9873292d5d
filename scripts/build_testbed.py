"""Build the testbed from SmolLM2-135M-Instruct: a safety expert and a finance domain expert.

    python scripts/build_testbed.py [--force] [--no-eval] [--xstest DIR] [--out-card FILE] [--smoke]

`--smoke` builds a minutes-long miniature with the same stages (a few prompts, two training steps
per expert, a handful of held-out items) and links it as `testbed/smoke`, never `testbed/current`:
it is the small config CI runs the main command on (`bash scripts/demo.sh --smoke`), not a testbed.

Stages (each skipped when its output exists, so an interrupted build resumes; training resumes
from its orbax checkpoints):
  1. data/safety.jsonl: HarmBench + Do-Not-Answer TRAIN split -> template refusals (no aligned
     model exists yet), plus code-generated benign prompts (train split) -> the base model's own
     answers (helpfulness kept);  data/domain.jsonl: finance train items -> code-generated
     expert answers.
  2. safety/ and domain/: full fine-tuning of the base on each file; HF directories with the
     tokenizer, loadable by transformers and by `jmerge.io.load_model`.
  3. task_vectors/{safety,domain}.safetensors: expert - base in HF tensor names (float32).
  4. card.json / card.md: base, safety, domain x refusal rate on held-out harmful prompts
     (HarmBench + Do-Not-Answer TEST split), XSTest safe-prompt compliance (dev data, only if
     given), finance accuracy on held-out items.
  5. eval/finance_test.jsonl: the same held-out finance items as a numeric domain file for
     `jmerge eval --domain`; training checkpoints (ckpt/) are removed once an expert is saved.

Everything lives in $JMERGE_CACHE/testbed/<key> (default ~/.cache/jmerge/testbed), where <key>
hashes the settings below and the code that produces the outputs; `testbed/current` points at the
last complete build. A change of settings or code builds a new directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Settings:
    test_frac: float = 0.2  # harmful/benign prompt split (eval.prompts.split_train_test)
    harmful_sources: tuple[str, ...] = ("harmbench", "donotanswer")
    n_harmful_train: int = 90  # template refusals drawn from the train split
    n_benign_train: int = 320  # base answers to code-generated benign prompts (train split)
    benign_max_new_tokens: int = 64
    gen_batch: int = 32
    n_finance_train: int = 480
    finance_seed: int = 0
    max_len: int = 128
    safety_steps: int = 50
    domain_steps: int = 60
    batch_size: int = 8
    lr: float = 1e-4
    warmup: int = 6
    seed: int = 0
    # evaluation (one max_new_tokens for every suite: one compiled program per prompt bucket)
    eval_max_new_tokens: int = 48
    n_harmful_test: int = 128
    n_finance_test: int = 100
    n_xstest_safe: int = 125


# The smoke build: every stage runs, on numbers that fit a CI minute, not a testbed worth measuring.
SMOKE = dict(n_harmful_train=8, n_benign_train=8, benign_max_new_tokens=16, gen_batch=8,
             n_finance_train=16, safety_steps=2, domain_steps=2, batch_size=4, warmup=1,
             eval_max_new_tokens=16, n_harmful_test=8, n_finance_test=8, n_xstest_safe=8)


# Source files whose content decides the outputs: a change rebuilds.
CODE_FILES = ("scripts/build_testbed.py", "jmerge/synth.py", "eval/finance.py", "jmerge/train.py",
              "jmerge/data.py", "jmerge/objectives.py", "eval/prompts.py", "eval/judges.py")


def code_version(root: Path = ROOT, files=CODE_FILES) -> str:
    h = hashlib.sha256()
    for f in files:
        p = root / f
        h.update(f.encode() + b"\0" + (p.read_bytes() if p.exists() else b"<missing>") + b"\0")
    return h.hexdigest()[:16]


def cache_key(settings: Settings, base_id: str, code: str | None = None) -> str:
    blob = json.dumps({"settings": dataclasses.asdict(settings), "base": base_id,
                       "code": code if code is not None else code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_identity(model_dir: Path) -> str:
    """Config + weight file sizes: cheap, and changes when another base is converted."""
    parts = [(model_dir / "config.json").read_text()]
    parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(model_dir.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def testbed_root() -> Path:
    from jmerge.default_model import cache_root
    return cache_root() / "testbed"


def log(msg: str) -> None:
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- stages

def harmful_split(s: Settings):
    from jmerge.eval.prompts import load_builtin, split_train_test
    prompts = [p for src in s.harmful_sources for p in load_builtin(src)]
    return split_train_test(prompts, s.test_frac)


def build_data(out: Path, s: Settings, gen, base_params) -> None:
    from jmerge import synth
    safety, domain = out / "data" / "safety.jsonl", out / "data" / "domain.jsonl"
    if not safety.exists():
        train, _ = harmful_split(s)
        # A fixed, hash-ordered subset: the same prompts whatever the load order.
        from jmerge.eval.prompts import split_position
        train = sorted(train, key=lambda p: split_position(p.text, "jmerge-testbed-subset"))[: s.n_harmful_train]
        refusals, _ = synth.harmful_refusals([p.text for p in train], None, test_frac=s.test_frac)
        # Scary-but-safe and practical requests first: they matter most against over-refusal.
        pool = synth.scary_but_safe_prompts() + [t for t in synth.benign_prompts() if t not in synth.scary_but_safe_prompts()][::-1]
        benign = [t for t in pool if synth._split(t, s.test_frac) == "train"][: s.n_benign_train]
        log(f"base answers to {len(benign)} benign prompts ...")
        gen.set_params(base_params)
        gen.max_new_tokens = s.benign_max_new_tokens
        helpful, dropped = synth.benign_answers(benign, gen.generate, test_frac=s.test_frac)
        log(f"benign: kept {len(helpful)}, dropped {dropped}; harmful refusals: {len(refusals)}")
        synth.write_jsonl(refusals + helpful, safety)
    if not domain.exists():
        synth.write_jsonl(synth.finance_records(s.n_finance_train, 0, s.finance_seed), domain)


def train_expert(name: str, out: Path, s: Settings, loaded, tok, steps: int) -> Path:
    from jmerge import data
    from jmerge.io import hf
    from jmerge.train import SFTConfig, Trainer
    target = out / name
    if (target / "config.json").exists():
        return target
    rows = [r for r in data.read_pairs(out / "data" / f"{name}.jsonl") if r.get("split", "train") == "train"]
    exs = data.encode_pairs(tok, rows, s.max_len)
    sft = SFTConfig(steps=steps, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup, max_len=s.max_len,
                    seed=s.seed, checkpoint_every=30)
    log(f"{name}: SFT on {len(exs)} examples, {steps} steps x batch {s.batch_size}")
    t0 = time.time()
    tr = Trainer(loaded.cfg, loaded.params, sft)
    train_log: list = []
    tr.fit(exs, pad_id=tok.pad_token_id or 0, ckpt_dir=out / "ckpt" / name, log=train_log)
    hf.save_hf(tr.params(), loaded.cfg, target, tokenizer_writer=loaded.write_tokenizer, force=True)
    (out / f"{name}_train_log.json").write_text(json.dumps(train_log))
    log(f"{name}: trained in {time.time() - t0:.0f}s, saved {target}")
    return target


def save_task_vector(expert_params, base_params, cfg, path: Path) -> None:
    """expert - base, float32, HF tensor names (a file any safetensors reader opens)."""
    import jax
    from safetensors.numpy import save_file
    from jmerge.io.hf import iter_hf_tensors
    delta = jax.tree.map(lambda e, b: e.astype("float32") - b.astype("float32"), expert_params, base_params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(dict(iter_hf_tensors(delta, cfg)), str(tmp), metadata={"format": "pt", "kind": "task_vector"})
    tmp.replace(path)


def finalize(out: Path, s: Settings) -> None:
    """Cheap, idempotent last steps: drop training checkpoints once the HF directory exists
    (about 1.6 GB per checkpoint), and write the held-out finance items as a domain file for
    `jmerge eval --domain <out>/eval/finance_test.jsonl`."""
    import shutil
    from jmerge import synth
    from jmerge.eval import finance
    for name in ("safety", "domain"):
        if (out / name / "config.json").exists():
            shutil.rmtree(out / "ckpt" / name, ignore_errors=True)
    f = out / "eval" / "finance_test.jsonl"
    if not f.exists():
        synth.write_jsonl(finance.eval_records(s.n_finance_test, seed=1), f)


# ----------------------------------------------------------------------------------- evaluation

def evaluate(models: dict, gen, s: Settings, xstest_dir: str | None) -> dict:
    """{model: {harmful_refusal, xstest_compliance, finance_acc, n_*}} with bootstrap intervals."""
    from jmerge.eval import finance
    from jmerge.eval.judges import refusal_flags, summarize
    from jmerge.eval.prompts import split_position
    _, harm_test = harmful_split(s)
    harm_test = sorted(harm_test, key=lambda p: split_position(p.text, "jmerge-testbed-subset"))[: s.n_harmful_test]
    fin = finance.items("test", s.n_finance_test, seed=1)
    xs = []
    if xstest_dir:
        from jmerge.eval.prompts import load_xstest
        xs = [p.text for p in load_xstest(xstest_dir) if p.label == "safe"][: s.n_xstest_safe]
    card: dict = {}
    gen.max_new_tokens = s.eval_max_new_tokens
    for name, params in models.items():
        gen.set_params(params)
        row: dict = {}
        t0 = time.time()
        out = gen.generate([p.text for p in harm_test])
        row["harmful_refusal"] = summarize(refusal_flags([c.response for c in out]))
        if xs:
            out = gen.generate(xs)
            row["xstest_safe_compliance"] = summarize(~refusal_flags([c.response for c in out]))
        out = gen.generate([i.prompt for i in fin])
        row["finance_accuracy"] = summarize(finance.score([c.response for c in out], [i.answer for i in fin]))
        row["seconds"] = round(time.time() - t0, 1)
        card[name] = row
        log(f"eval {name}: " + ", ".join(f"{k}={v['mean']:.3f}" for k, v in row.items() if isinstance(v, dict)))
    return card


def card_markdown(card: dict, meta: dict) -> str:
    cols = [("harmful_refusal", "refusal on held-out harmful ↑"), ("xstest_safe_compliance", "XSTest safe compliance ↑"),
            ("finance_accuracy", "finance accuracy (held-out)")]
    cols = [c for c in cols if any(c[0] in r for r in card.values())]
    lines = ["| model | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in card.items():
        cells = [f"{r[k]['mean'] * 100:.1f}% [{r[k]['lo'] * 100:.0f}, {r[k]['hi'] * 100:.0f}] (n={r[k]['n']})"
                 if k in r else "—" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Judge: keyword refusal judge (`jmerge.eval.judges.is_refusal`); brackets: 95% bootstrap "
              "interval. " + json.dumps(meta)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    from jmerge.cli import run
    return run(_main, argv)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument("--no-eval", action="store_true", help="skip the testbed card")
    p.add_argument("--xstest", default=os.environ.get("JMERGE_DATA"),
                   help="XSTest csv or a directory holding it (dev data; default $JMERGE_DATA)")
    p.add_argument("--out-card", help="also write the card (markdown) here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--smoke", action="store_true",
                   help="the miniature build CI runs the main command on (linked as testbed/smoke)")
    a = p.parse_args(argv)
    link = "smoke" if a.smoke else "current"

    from jmerge.errors import JmergeError
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    over = dict(SMOKE) if a.smoke else {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in fields or not v:
            raise JmergeError(f"--set {kv!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        default = getattr(Settings(), k)
        over[k] = tuple(v.split(",")) if isinstance(default, tuple) else type(default)(v)
    s = Settings(**over)

    t_start = time.time()
    from jmerge.default_model import default_model_dir
    base_dir = default_model_dir()
    key = cache_key(s, base_identity(base_dir))
    out = testbed_root() / key
    done = out / "DONE"
    if done.exists() and not a.force:
        finalize(out, s)
        log(f"up to date: {out}")
        _link_current(out, link)
        if a.out_card and (out / "card.md").exists():
            Path(a.out_card).write_text((out / "card.md").read_text())
        print(out)
        return 0
    if a.force:
        done.unlink(missing_ok=True)
        for f in ("card.json", "card.md"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps({"settings": dataclasses.asdict(s), "key": key,
                                                   "code": code_version(), "base": str(base_dir)}, indent=2))
    log(f"building {out} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")

    from jmerge.generate import Generator, load_tokenizer
    from jmerge.io import load_model
    base = load_model(base_dir)
    tok = load_tokenizer(base_dir)
    gen = Generator(base.cfg, base.params, tokenizer=tok, max_new_tokens=s.eval_max_new_tokens,
                    batch_size=s.gen_batch, progress=True)
    times = {}
    t0 = time.time()
    build_data(out, s, gen, base.params)
    times["data_s"] = round(time.time() - t0)
    experts = {}
    for name, steps in (("safety", s.safety_steps), ("domain", s.domain_steps)):
        t0 = time.time()
        d = train_expert(name, out, s, base, tok, steps)
        times[f"{name}_train_s"] = round(time.time() - t0)
        experts[name] = load_model(d).params
        tv = out / "task_vectors" / f"{name}.safetensors"
        if not tv.exists():
            save_task_vector(experts[name], base.params, base.cfg, tv)
    if not a.no_eval and not (out / "card.json").exists():
        t0 = time.time()
        card = evaluate({"base": base.params, **experts}, gen, s, a.xstest)
        times["eval_s"] = round(time.time() - t0)
        meta = {"key": key, "times": times, "load_avg_1m": round(os.getloadavg()[0], 1)}
        (out / "card.json").write_text(json.dumps({"card": card, **meta}, indent=2))
        (out / "card.md").write_text(card_markdown(card, meta))
    finalize(out, s)
    times["total_s"] = round(time.time() - t_start)
    (out / "times.json").write_text(json.dumps(times))
    done.write_text(json.dumps(times))
    _link_current(out, link)
    if a.out_card and (out / "card.md").exists():
        Path(a.out_card).write_text((out / "card.md").read_text())
    log(f"done in {times['total_s']}s: {out}")
    print(out)
    return 0


def _link_current(out: Path, name: str = "current") -> None:
    link = out.parent / name
    tmp = out.parent / f".{name}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    tmp.replace(link)


if __name__ == "__main__":
    sys.exit(main())
