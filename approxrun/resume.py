"""The resume state: the run folder's ``resume.pt``, from which a killed run continues.

Rewritten atomically at every stage end and epoch end. It holds the completed stages (name,
stage-cache key, metrics record), the state stages pass on, the model and random states at the end
of the last completed stage, and the epoch state of the stage in progress (its training progress,
see :class:`approxrun.training.TrainingProgress`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from approxrun.stages import StageContext
from approxrun.training import TrainingProgress, rng_state
from approxrun.utils.files import atomic_torch_save

log = logging.getLogger("approxrun")

RESUME_FILE = "resume.pt"


class ResumeState:
    def __init__(self, path: Path):
        self.path = path
        self.completed: list[dict] = []
        self.state: dict = {}
        self.model: dict | None = None
        self.rng: dict | None = None
        self.in_progress: dict | None = None

    def load(self, keys: list[tuple[str, str]]) -> bool:
        """Take over a saved resume state whose stages are these (name, key) pairs' first ones.

        Returns whether there is anything to resume; a resume state of another configuration (or
        an unreadable one) is ignored and the run starts over.
        """
        if not self.path.is_file():
            return False
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            done = [(entry["name"], entry["key"]) for entry in saved["completed"]]
            in_progress = saved["in_progress"]
        except Exception as exc:
            log.warning("resume state %s is unreadable (%s); starting over", self.path, exc)
            return False
        pending = [] if in_progress is None else [(in_progress["name"], in_progress["key"])]
        if done + pending != keys[:len(done) + len(pending)]:
            log.warning("resume state %s belongs to another configuration; starting over", self.path)
            return False
        self.completed, self.state, self.model, self.rng = \
            saved["completed"], saved["state"], saved["model"], saved["rng"]
        self.in_progress = in_progress
        return bool(self.completed) or in_progress is not None

    def training_progress(self, name: str, key: str) -> TrainingProgress:
        """The progress object of stage ``name``: saves each epoch here, resumes an interrupted one."""
        resume_from = self.in_progress if self.in_progress is not None and self.in_progress["name"] == name else None
        return TrainingProgress(lambda epoch_state: self._write(dict(epoch_state, name=name, key=key)), resume_from)

    def stage_done(self, name: str, key: str, record: dict, ctx: StageContext) -> None:
        self.completed.append({"name": name, "key": key, "record": record})
        self.state = dict(ctx.state)
        self.model = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
                      for k, v in ctx.model.state_dict().items()}
        self.rng = rng_state(ctx.loaders[0].generator)
        self._write(None)

    def _write(self, in_progress: dict | None) -> None:
        atomic_torch_save({"completed": self.completed, "state": self.state, "model": self.model,
                           "rng": self.rng, "in_progress": in_progress}, self.path)
