"""`jmerge check CONFIG.yml`: everything that can be wrong with a merge, found before any merge."""

if __name__ == "__main__":
    from jmerge.cli import module_main
    module_main("check")
