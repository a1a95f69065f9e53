"""A base for state objects that hold a lock and must still pickle (no framework imports)."""

import threading


class LockedState:
    """Pickles without its ``_lock`` (locks do not pickle) and makes a new one when unpickled,
    like PyTorch's PowerSGDState; subclasses set ``self._lock = threading.Lock()``."""

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
