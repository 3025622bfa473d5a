"""The command line every benchmark shares: its module docstring is its --help."""

from __future__ import annotations

import argparse


def parser_from_doc(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest."""
    summary, _, details = (doc or "").partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=details or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
