"""`python -m release.cli`: how the pipeline runs each step in its own process."""

from release.cli import main

main()
