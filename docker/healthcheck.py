"""The image's HEALTHCHECK: exit 0 when the server's ``/readyz`` answers 200 (model loaded,
database answering), 1 otherwise. Port from MEMCHAT_PORT (default 8000); standard library only."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('MEMCHAT_PORT') or '8000'}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            print(response.read().decode(errors="replace"))
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:  # 503 while the model loads
        print(f"{exc.code} {exc.read().decode(errors='replace')}")
    except OSError as exc:  # not listening yet, or timed out
        print(f"{url}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
