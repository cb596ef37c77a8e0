"""``python -m services.ingress``: run the ingress service (``--help`` lists its settings)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from shared.service import configure_logging, run_service

from .main import run_ingress
from .settings import IngressSettings


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m services.ingress",
        description="agentbus ingress: validates, de-duplicates and rate-limits user messages, "
        "and forwards them as TurnRequested. Configured by environment variables:",
        epilog=IngressSettings.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    settings = IngressSettings.from_env()
    configure_logging(settings)
    return asyncio.run(run_service(settings, lambda stop, probes: run_ingress(settings, stop, probes)))


if __name__ == "__main__":
    sys.exit(main())
