"""
Release day in one command: convert, verify, evaluate, card and push every official checkpoint in a folder, as the
release manifest `model_cards/manifest.json` names them.

Examples and details: `python scripts/release.py --help` (the command line lives in `hf_fss.hub.release`).
The same command, installed: `hf-fss release ...` (`hf_fss.cli`).
"""

from hf_fss.hub.release import main, parse_args  # noqa: F401 (tests import them from here)

if __name__ == "__main__":
    raise SystemExit(main())
