#!/usr/bin/env python3
"""Health check of the engine images: exit 0 when GET /health on $ENGINE_PORT answers 200.

Standard library only (it runs every few seconds; importing the engine would load JAX).
In a multi-host slice only rank 0 serves HTTP: on the other ranks ($ENGINE_NODE_RANK > 0)
it passes, since their process exits, and the container with it, when the group breaks.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    if os.environ.get("ENGINE_NODE_RANK", "0") not in ("", "0"):
        return 0
    url = f"http://127.0.0.1:{os.environ.get('ENGINE_PORT', '30000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:  # 503 while loading, refused before
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
