"""Parses a command's arguments the way it would, then exits 0 without running it.

    python tests/doc_check_args.py launch/train.py --config=... --workdir=...
    python tests/doc_check_args.py -m deepretrieval_jax.data.build --name=...

absl entry points (`app.run`, including `runtime.experiment_main`'s parser, which loads the
config file and applies every `--config.a.b=v` override) and argparse ones are both covered;
a parse error exits non-zero with the program's own message.
"""

import argparse
import runpy
import sys

from absl import app, flags


def _parse_only(main, argv=None, flags_parser=None):
    del main
    argv = sys.argv if argv is None else argv
    (flags_parser or flags.FLAGS)(argv)
    sys.exit(0)


_parse_args = argparse.ArgumentParser.parse_args


def _argparse_only(self, args=None, namespace=None):
    _parse_args(self, args, namespace)
    sys.exit(0)


if __name__ == "__main__":
    app.run = _parse_only
    argparse.ArgumentParser.parse_args = _argparse_only
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, ".")
        runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(f"{sys.argv[0]}: parsed no arguments (not an absl or argparse program?)")
