"""``python -m orchard {doctor,demo}``."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m orchard {doctor,demo} [options]\n"
             "  doctor  versions, build info, devices and a fwd/bwd self-check (exit 1 on FAIL)\n"
             "  demo    train a small char-level transformer LM through Orchard "
             "(see `python -m orchard demo --help`)")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "doctor":
        from .doctor import main as doctor_main
        return doctor_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    print(f"unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
