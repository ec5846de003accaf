"""Keep the best model of the periodic evaluations without changing what ``--resume`` loads."""

from __future__ import annotations

import os

from detectron2.engine import hooks

__all__ = ["BestCheckpointer"]


class BestCheckpointer(hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer`` (``model_best.pth`` after each evaluation that improves
    the tracked metric), except that ``last_checkpoint`` keeps naming the latest periodic
    checkpoint.

    detectron2 v0.6 saves the best model with ``Checkpointer.save``, which also points
    ``last_checkpoint`` at ``model_best.pth``: ``--resume`` would then continue from the best
    evaluation (possibly an earlier iteration, or past ``SOLVER.MAX_ITER`` when saved by the
    final evaluation) instead of from the latest checkpoint. Must be registered after the
    ``EvalHook`` that produces the metric.
    """

    def _best_checking(self) -> None:
        checkpointer = self._checkpointer
        previous = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
        super()._best_checking()
        current = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else None
        if current == previous:
            return
        if previous:
            checkpointer.tag_last_checkpoint(os.path.basename(previous))
        elif checkpointer.save_to_disk:
            # No checkpoint to resume from yet: a resumed run starts over, as it would have.
            os.remove(os.path.join(checkpointer.save_dir, "last_checkpoint"))
