"""`python -m jmerge.search --config configs/X.yaml`: `jmerge search`, which lives in jmerge/cli/search.py."""

if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("search")
