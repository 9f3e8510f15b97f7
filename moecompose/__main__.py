"""``python -m moecompose``: the command line (``torchrun -m moecompose train ...``)."""

from moecompose.cli import main

main()
