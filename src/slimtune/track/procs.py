"""Whether the process that wrote a record is still running: `runs list` (a "running" run whose trainer is
gone is "dead") and the sweep (a RUNNING trial whose worker is gone is failed and queued again) ask the same."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def process_alive(pid: int | str | None, host: str | None = None) -> bool:
    """False only when `pid` on this machine is known to be gone: no such process, or a zombie (killed, not yet
    reaped by its parent, so it will never write again). No pid, another host's pid, or a process of another
    user: True, since nothing here can tell."""
    if not pid or (host is not None and host != socket.gethostname()):
        return True
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the parenthesised command name
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill's answer stands
