"""``mode="local"``: everything in sequence on one device, with the exact semantics.

The rewritten graph is compiled whole by the inner compiler. It saves no time
(the members still run one after the other); it is the reference the other
modes equal, and what ``"auto"`` picks where nothing runs side by side.
"""

from __future__ import annotations

from . import ExecutionMode, GraphContext, ModeChoice


class LocalMode(ExecutionMode):
    name = "local"

    @classmethod
    def suits(cls, context: GraphContext) -> ModeChoice:
        if context.device.type == "cuda":
            return ModeChoice("local", why="CUDA without CUDA graphs (launch-bound; torch.compile(..., "
                                           "mode='reduce-overhead') runs the members concurrently in one graph)")
        return ModeChoice("local", why=f"{context.device.type} with {context.threads} thread(s): nothing runs side "
                                       "by side, so CQIL saves no time here")


MODE = LocalMode
