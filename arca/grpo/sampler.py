"""The trainer's prompt order: TRL's `RepeatSampler`, reseeded at each epoch so that a resumed run draws what an
uninterrupted one would."""

from __future__ import annotations

from typing import Any

from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` reseeded with `seed + epoch` at each epoch, so that a run resumed in a later
    epoch (whose skipped epochs are never iterated) draws the same order as an uninterrupted one. Epoch 0
    is TRL's order exactly."""

    @classmethod
    def for_trainer(cls, trainer: Any, dataset: Any = None) -> EpochSeededRepeatSampler:
        """The sampler with the arguments `GRPOTrainer._get_train_sampler` gives TRL's own."""
        return cls(
            data_source=trainer.train_dataset if dataset is None else dataset,
            mini_repeat_count=trainer.num_generations,
            batch_size=trainer.args.generation_batch_size // trainer.num_generations,
            repeat_count=trainer.num_iterations * trainer.args.steps_per_generation,
            shuffle=trainer.shuffle_dataset,
            seed=trainer.args.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)
