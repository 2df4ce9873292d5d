"""Kept so `python -m jmerge.eval_cli` keeps working: `jmerge eval` lives in jmerge/cli/eval.py."""

if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("eval")
