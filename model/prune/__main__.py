"""`python -m model.prune`: prune a teacher on a calibration file and save the student (`model.prune.cli`)."""

import logging

from .cli import main, make_parser

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (prune_args,) = make_parser().parse_args_into_dataclasses()
    main(prune_args)
