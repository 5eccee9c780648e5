"""``python -m slmcompress`` (also what ``torchrun -m slmcompress`` runs)."""

from slmcompress.cli import main

main()
