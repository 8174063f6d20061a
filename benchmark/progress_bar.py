"""Lightning's tqdm bar counting steps over a whole fit and cases in test (see
:mod:`benchmark.progress`). Imports Lightning, so it is kept out of the CLI's import path."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar", "wants_step_bar"]


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting steps over the whole fit and cases in test.

    Training: one bar ``train step k/total`` from ``trainer.global_step`` to
    ``trainer.estimated_stepping_batches`` (``max_steps``, or epochs × batches), continued
    (not restarted) across epochs and on resume from a checkpoint. Test: ``test case k/N``
    with the last case's id and Dice as postfix (read from ``pl_module.test_records``).
    Validation keeps Lightning's nested bar.
    """

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        """The postfix: logged progress-bar metrics, without the logger's version number."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        bar = self.train_progress_bar
        bar.reset(total=None if total is None or not math.isfinite(total) else int(total))
        bar.initial = 0
        bar.n = int(trainer.global_step)
        bar.set_description("train step")
        bar.refresh()

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        # No reset per epoch: the bar counts steps of the whole fit.
        self.train_progress_bar.set_description(f"train step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        n = int(trainer.global_step)
        if self._should_update(n, bar.total) or n != bar.n:
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx: int = 0) -> None:
        super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        self.test_progress_bar.set_description("test case")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        recs = getattr(pl_module, "test_records", None)
        if recs:
            last = recs[-1]
            post = {"case": str(last.get("case_id", ""))}
            d = last.get("dice")
            if isinstance(d, float) and math.isfinite(d):
                post["dice"] = f"{d:.3f}"
            self.test_progress_bar.set_postfix(post)


def wants_step_bar(trainer) -> bool:
    """True when the trainer shows Lightning's default tqdm bar (replace it with ours);
    False when progress bars are off or the user chose another bar."""
    bar = getattr(trainer, "progress_bar_callback", None)
    return type(bar) is TQDMProgressBar
