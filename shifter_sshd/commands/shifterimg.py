"""``shifterimg``: Shifter's image command, for users' habits and scripts.

    shifterimg pull docker:ubuntu:22.04     (root: the store is the admins')
    shifterimg images                       the store's images
    shifterimg lookup ubuntu:22.04          an image's id

Shifter's gateway queued pulls for users; here the store belongs to root, so
``pull`` is for admins (a user gets a clear message), while ``images`` and
``lookup`` work for everyone, as the SPANK plugin's lookup does.
"""

from __future__ import annotations

import os
import sys

from ..errors import EXIT_OK, EXIT_USAGE, Kind, ShifterError

USAGE = "usage: shifterimg [--config PATH] pull|images|lookup [NAME]\n"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if len(args) >= 2 and args[0] == "--config":
        config_path, args = args[1], args[2:]
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE + (__doc__ or ""))
        return EXIT_OK if args else EXIT_USAGE
    verb, rest = args[0], args[1:]
    try:
        return _run(verb, rest, config_path)
    except ShifterError as err:
        sys.stderr.write(f"shifterimg: {str(err).removeprefix('shifter-sshd: ')}\n")
        return err.exit_code


def _run(verb: str, rest: list[str], config_path: str | None) -> int:
    from ..config import udiroot as config
    from ..image import store as image

    settings = config.load(config_path)
    store = image.Store.from_config(settings)
    if verb == "images" and not rest:
        for name, record in store.list():
            kind, _sep, tag = name.partition(":")
            print(f"{settings.system or '-':<10} {kind:<7} READY {record.id[:10]} "
                  f"{record.created.replace('T', ' ').rstrip('Z'):<19} {tag}")  # fmt: skip
        return EXIT_OK
    if verb == "lookup" and len(rest) == 1:
        print(store.lookup(rest[0]).id)
        return EXIT_OK
    if verb == "pull" and len(rest) == 1:
        if os.geteuid() != 0:
            raise ShifterError("pull", "the image store is the admins': ask them to pull it "
                               "(shifter-sshd image pull)", rest[0], Kind.USER)  # fmt: skip
        from ..image import pull

        record, downloaded = pull.pull(settings, rest[0])
        print(f"{rest[0]}: {'pulled' if downloaded else 'up to date'}: {record.id}")
        return EXIT_OK
    sys.stderr.write(USAGE)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
