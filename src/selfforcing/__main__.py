"""``python -m selfforcing ...`` (and ``torchrun --nproc-per-node N -m selfforcing train ...``)."""

from .cli import main

main()
