"""The `mixserve` command: one subcommand per process kind.

Each subcommand lives in the module that owns it; that module exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
subcommand runs, so `mixserve launch` (the router) never imports torch.
"""

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo-model": ("mixserve.shards.demo.checkpoint", "write the deterministic random-weight demo Mixtral"),
    "shard": ("mixserve.shards.cli", "serve one tensor-parallel shard over gRPC"),
    "launch": ("mixserve.router.launcher", "start the shards and the router, and serve"),
    "bench": ("mixserve.benchmarks.cli", "benchmark harness: serving load, shard latency, roofline, comparison"),
}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default is
    (a default read from the environment, such as a key, is never shown)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help.lower():
            return action.help
        return super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mixserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)
        return 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(
        prog=f"mixserve {name}", description=SUBCOMMANDS[name][1], formatter_class=DefaultsHelpFormatter
    )
    module.add_arguments(sub_parser)
    return module.run(sub_parser.parse_args(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
