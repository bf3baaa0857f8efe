"""ServerState's ready transition, without a model: what happens before the engine starts."""

from __future__ import annotations

import asyncio
import gc
import types

from engine.server.api import ServerOptions, ServerState


def test_ready_freezes_the_startup_heap_before_the_engine_thread_starts() -> None:
    """Everything alive at ready (modules, JAX's caches, the model's host objects) moves to
    the GC's permanent generation, so full collections while serving do not walk it."""
    loaded = [object() for _ in range(3)]  # stands for what loading the model left alive
    seen: dict[str, int] = {}

    class Engine:  # the AsyncEngine's part _ready uses
        engine = types.SimpleNamespace(startup=None)

        def start(self) -> None:
            seen["frozen"] = gc.get_freeze_count()
            seen["tracked"] = sum(1 for o in gc.get_objects() if o is loaded)

    state = ServerState(None, ServerOptions(), lambda: None)  # type: ignore[arg-type]
    gc.unfreeze()
    try:
        asyncio.run(_ready(state, Engine()))
        # The engine thread started with the heap frozen: the list made before ready is
        # no longer among the objects a collection examines.
        assert seen["frozen"] > len(loaded)
        assert seen["tracked"] == 0
        assert state.serving is not None and state.aeng is not None
    finally:
        gc.unfreeze()


async def _ready(state: ServerState, aeng: object) -> None:
    state._ready(aeng, types.SimpleNamespace(max_model_len=8))  # type: ignore[arg-type]
