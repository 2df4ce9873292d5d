"""`jmerge default-model`: the embedded SmolLM2 default's HF directory (fetched and converted once)."""

from __future__ import annotations

from jmerge import default_model
from jmerge.cli import ArgumentParser


def main(argv=None) -> int:
    # the library's docstring is the help text: what is fetched, from where, into which cache
    p = ArgumentParser(prog="jmerge default-model", description=default_model.__doc__)
    p.parse_args(argv)
    print(default_model.default_model_dir())
    return 0
