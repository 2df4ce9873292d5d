"""Kept so `python -m jmerge.merge_cli` keeps working: `jmerge merge` lives in jmerge/cli/merge.py."""

if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("merge")
