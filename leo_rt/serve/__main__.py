"""`python -m leo_rt.serve [options]`: the same as `leo-rt serve`."""

import argparse
import sys

from ..errors import describe, exit_code
from .command import add_serve_arguments, run_server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m leo_rt.serve", description="live avatars over WebRTC/WebSocket")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_server(args)
    except BaseException as e:
        code = exit_code(e)
        if code is None:
            raise
        print(describe(e), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
