"""Is the Hugging Face Hub reachable? Asked before Hub loads, because huggingface_hub retries an
unreachable Hub with backoff (23 to 54 s measured here) before it fails."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def hub_offline_flag() -> bool:
    """True when the user (HF_HUB_OFFLINE) or a caller has put huggingface_hub in offline mode."""
    from huggingface_hub import constants as hub_constants

    return bool(hub_constants.HF_HUB_OFFLINE)


def hub_reachable() -> bool:
    """True when a TCP connection to the Hub endpoint opens within a few seconds.

    Behind an HTTPS proxy a direct connection says nothing, so we assume reachable there.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants as hub_constants

    url = urlparse(hub_constants.ENDPOINT)
    if not url.hostname:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True
