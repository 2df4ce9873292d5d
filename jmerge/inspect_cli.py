"""Kept so `python -m jmerge.inspect_cli` keeps working: `jmerge inspect` lives in jmerge/cli/inspect.py."""

if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("inspect")
