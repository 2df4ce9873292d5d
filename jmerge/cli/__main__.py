from jmerge.cli import entry

entry()
