"""The contract every trainer glue implements: the names a patch may call.

A glue is the one object a patch creates inside an upstream trainer. It owns the
head, its optimizer, the capture, the target source and the checkpoint entry;
the trainer's model does not own it as a submodule. Every glue has the same
lifecycle, under the same names:

    glue = TheGlue(model, args, ...)               # once, where the trainer builds its model
    glue.load_checkpoint_state(checkpoint)         # where the trainer resumes
    with glue.capturing():                         # around the student's forward / rollout
        loss = ...                                 # the trainer's own loss
        loss = glue.add_term(loss, ...)            # + the term; trainer-specific inputs after ``loss``
    loss.backward(); optimizer.step()
    glue.after_generator_step()                    # the head steps (and whatever follows the student's step)
    glue.after_critic_step(train_generator)        # DMD critic steps: projector replay; a no-op without a critic
    logged.update(glue.log_values())               # next to the trainer's losses
    checkpoint.update(glue.checkpoint_state())     # {"foresight": {...}} ({} when the term is off)

With the term off every call is a no-op and ``add_term`` returns ``loss`` itself.
``TrainerGlue`` states it for type checkers; ``tests/test_glue_contract.py``
checks every glue class in ``mirai_plugin.integrations`` against it, name by
name and signature by signature. A new upstream: copy the glue file closest to
it, keep these names, and write its patch (docs/design.md, "Adding a trainer").
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

CHECKPOINT_KEY = "foresight"
"""The key of every glue's entry in the trainer's checkpoint."""

LEGACY_CHECKPOINT_KEYS = ("mirai",)
"""Keys earlier versions wrote (``"mirai"``: ``LlamaGenMirai`` before 0.2.0): read, never written."""


@runtime_checkable
class TrainerGlue(Protocol):
    """What a patch calls on a glue; the order of one training step is in the module docstring."""

    @property
    def active(self) -> bool:
        """The term counts at this step (on, and not zero by the weight schedule)."""
        ...

    def capturing(self) -> AbstractContextManager[Any]:
        """Context manager around the student's forward or rollout: captures its hidden states."""
        ...

    def add_term(self, loss: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``loss`` plus the term (``loss`` itself when not active); the arguments after ``loss``
        are what the trainer has at hand to build the targets."""
        ...

    def after_generator_step(self) -> None:
        """After the student's optimizer step: the head steps."""
        ...

    def after_critic_step(self, train_generator: bool) -> None:
        """After a critic optimizer step (DMD): projector replay; a no-op where there is no critic."""
        ...

    def log_values(self) -> dict[str, float]:
        """Values to log next to the trainer's losses, cleared once read (empty when off)."""
        ...

    def checkpoint_state(self) -> dict[str, Any]:
        """``{CHECKPOINT_KEY: state}`` for the trainer's checkpoint (empty when off)."""
        ...

    def load_checkpoint_state(self, checkpoint: Mapping[str, Any], *, strict: bool = False) -> None:
        """Resume from a checkpoint ``checkpoint_state`` wrote; without an entry nothing happens
        unless ``strict``."""
        ...


def checkpoint_entry(checkpoint: Any) -> Any | None:
    """The glue's entry of a trainer checkpoint: under ``CHECKPOINT_KEY``, else under a legacy
    key, else ``None`` (also for a checkpoint that is not a mapping).

    >>> checkpoint_entry({"model": {}, "foresight": {"head": 1}})
    {'head': 1}
    >>> checkpoint_entry({"mirai": {"head": 1}})  # written by LlamaGenMirai 0.1
    {'head': 1}
    >>> checkpoint_entry({"model": {}}) is None
    True
    """
    if not isinstance(checkpoint, Mapping):
        return None
    for key in (CHECKPOINT_KEY, *LEGACY_CHECKPOINT_KEYS):
        if key in checkpoint:
            return checkpoint[key]
    return None
