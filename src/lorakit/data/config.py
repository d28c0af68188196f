"""Options of `lorakit data preview`."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.config import opt
from lorakit.options import ModelOptions, PromptDataOptions


@dataclass
class PreviewConfig(PromptDataOptions, ModelOptions):
    """Options of `lorakit preview`."""

    num: int = opt(3, "how many examples to show")
    json: bool = opt(False, "print one JSON object per line with input_ids and labels")

    def validate(self) -> None:
        self.validate_data()
