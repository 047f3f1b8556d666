"""Keep the controller's long-lived objects out of the garbage collector's full passes.

A controller with 2,000 probes holds some 200,000 objects that live as long as the process: the
config, the probe states, the scheduler's entries. Each full collection walks all of them on the
event loop's thread, a pause in which no probe starts and no tick runs (0.3-0.7 s seen on a loaded
2-core machine; `bench/scale.py` prints the pause with and without this). After start-up and after
each reload, what is alive is collected once and frozen (`gc.freeze`): later passes walk only what
was allocated since. A frozen object is still freed by reference counting when dropped; only a
cycle among frozen objects would outlive its use, which is why the garbage is collected first.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect, then freeze what is left; returns how many objects are now out of the passes."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
