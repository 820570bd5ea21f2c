"""The DGSS training command: ``python -m rein.train`` or ``rein-train`` (see loop.py)."""


def main(argv=None) -> int:
    from .loop import main as _main  # imported on use: rein.evaluate imports rein.train.data

    return _main(argv)


__all__ = ["main"]
