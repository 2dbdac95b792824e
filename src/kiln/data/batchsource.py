"""The contract between the trainer and a source of micro-batches: pretraining's loaders (text, prepared
shards, data stages) and post-training's (SFT rows, DPO pairs, RLVR prompts) all derive from it."""

from __future__ import annotations

from typing import Any


class BatchSource:
    """A Stateful, deterministic, endless source of micro-batches (each has `.to(device)`). A subclass
    implements next_batch, state_dict and load_state_dict, and overrides the rest where it has them."""

    reshards = False  # load_resharded_state takes a position saved on another data-parallel size
    changed_future: tuple[int, ...] | list[int] = ()  # data.stages changed since the checkpoint, not yet reached

    def next_batch(self) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def load_resharded_state(self, states: list[dict[str, Any]]) -> None:
        """This rank's position from every saved rank's, saved on another data-parallel size (`reshards`)."""
        raise NotImplementedError(f"{type(self).__name__} does not reshard")

    def close(self) -> None:
        """Release worker processes and files; the trainer calls it at the run's end."""
