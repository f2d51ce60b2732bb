"""What a dataset looks like to a model, and the error type of the models package."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["image", "tabular", "sequence"]
TASK_KINDS: tuple[TaskKind, ...] = ("image", "tabular", "sequence")


class ModelError(ValueError):
    """A model cannot be built or trained as asked; the message is one line naming the fix."""


def _describe_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True as a class count is always a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class TaskSpec:
    """Shape of one example and of the label space.

    input_shape is per example: (C, H, W) for images, (F,) for tabular features, (T,) for token
    sequences. vocab_size is set only for token-sequence tasks, whose inputs are int64 token ids.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        shape = self.input_shape
        if not isinstance(shape, (tuple, list)) or not all(_is_int(d) for d in shape):
            raise ModelError(
                f"input_shape {shape!r} is not a tuple of ints; "
                "use (C, H, W) for images, (F,) for tabular data or (T,) for token sequences"
            )
        shape = tuple(shape)
        if len(shape) not in (1, 3) or any(d < 1 for d in shape):
            raise ModelError(
                f"input_shape {shape!r} is not supported; use positive sizes in (C, H, W) for images, "
                "(F,) for tabular data or (T,) for token sequences"
            )
        # Lists come from JSON/TOML configs; store a tuple so the spec stays hashable.
        object.__setattr__(self, "input_shape", shape)
        if not _is_int(self.num_classes) or self.num_classes < 2:
            raise ModelError(
                f"num_classes {self.num_classes!r} is not allowed; use an int >= 2 "
                "(binary tasks have 2 classes)"
            )
        if self.vocab_size is not None:
            if not _is_int(self.vocab_size) or self.vocab_size < 2:
                raise ModelError(
                    f"vocab_size {self.vocab_size!r} is not allowed; use an int >= 2, "
                    "or None for image and tabular tasks"
                )
            if len(shape) != 1:
                raise ModelError(
                    f"vocab_size is set but input_shape {shape!r} is not (T,); token-sequence tasks "
                    "have input_shape (T,), or leave vocab_size None for images"
                )

    @property
    def kind(self) -> TaskKind:
        if self.vocab_size is not None:
            return "sequence"
        return "image" if len(self.input_shape) == 3 else "tabular"

    def describe(self) -> str:
        """Short human description used in error messages, e.g. '1x28x28 images'."""
        if self.kind == "image":
            return f"{_describe_shape(self.input_shape)} images"
        if self.kind == "sequence":
            return f"token sequences of length {self.input_shape[0]} (vocab {self.vocab_size})"
        return f"tabular rows of {self.input_shape[0]} features"
