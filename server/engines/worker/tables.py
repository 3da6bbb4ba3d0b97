"""table-question-answering: TAPAS through transformers' pipeline, several requests in one forward.

The pipeline's own batching does not work for this task (``batch_size > 1`` fails unbatching its outputs), so
``run`` uses the pipeline's steps itself: ``preprocess`` per request (the TAPAS tokenizer, the request's
``padding``/``truncation``), one forward over the padded stack, ``postprocess`` per request. Padding cannot
change an answer: pad tokens sit in the question's cell (row 0, column 0), which TAPAS never selects; a model
that may select that column (``allow_empty_column_selection``) is batched only with requests of the same length.
``sequential`` requests (SQA-style: each forward fed the previous answer) run one at a time, as the pipeline's
``sequential_inference``, so no request is fed another's answer.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from server.engines.worker.media import LoadSpec, MediaModel, load_pipeline
from server.errors import InvalidRequest
from server.tasks.media_requests import MediaRequest, TableQARequest

TRUNCATIONS = ("drop_rows_to_fit", "do_not_truncate")  # TapasTruncationStrategy (True/False name them too)


@dataclass(frozen=True)
class _Item:
    table: dict[str, list[str]]
    query: str
    options: dict[str, Any]  # the pipeline's preprocess arguments the request sets
    truncating: bool  # rows that do not fit are dropped (TAPAS's default)


def _cell(value: str | int | float) -> str:
    """A cell as the TAPAS tokenizer needs it: text (JSON numbers as Python writes them: 3, 2.5)."""
    return value if isinstance(value, str) else str(value)


def _coordinates(coordinates: list[Any]) -> list[list[int]]:
    return [[int(row), int(column)] for row, column in coordinates]


class TableQA(MediaModel):
    task = "table-question-answering"

    def __init__(self, spec: LoadSpec) -> None:
        import torch

        self.torch = torch
        self.pipe: Any = load_pipeline(spec)
        if self.pipe.type != "tapas":
            raise ValueError(f"`{spec.repo}` is not a TAPAS model; table-question-answering serves TAPAS models only")
        self.model = self.pipe.model.eval()
        self.config = self.model.config
        tokenizer: Any = self.pipe.tokenizer
        self.pad_id = tokenizer.pad_token_id or 0
        self.pad_freely = not getattr(self.config, "allow_empty_column_selection", False)
        limit = tokenizer.model_max_length
        known = isinstance(limit, int) and 0 < limit < 1_000_000
        self.max_len = int(limit) if known else int(self.config.max_position_embeddings)

    def info(self) -> dict[str, Any]:
        labels = getattr(self.config, "aggregation_labels", None) if self.pipe.aggregate else None
        return {"aggregation_labels": [labels[i] for i in sorted(labels)] if labels else []}

    def prepare(self, request: MediaRequest) -> tuple[_Item, Hashable]:
        assert isinstance(request, TableQARequest)
        params = request.parameters
        options: dict[str, Any] = {}
        if params.padding is not None:
            options["padding"] = params.padding
        if params.truncation is not None:
            if isinstance(params.truncation, str) and params.truncation not in TRUNCATIONS:
                raise InvalidRequest(f"`truncation` must be true, false, or one of {', '.join(TRUNCATIONS)}.",
                                     param="truncation")
            options["truncation"] = params.truncation
        table = {str(column): [_cell(v) for v in cells] for column, cells in request.inputs.table.items()}
        query = request.inputs.query
        truncating = options.get("truncation", True) not in (False, "do_not_truncate")
        # At least a token per word of the query, per header and (untruncated) per cell, and [CLS], [SEP].
        floor = 2 + len(query.split()) + sum(max(1, len(column.split())) for column in table)
        if not truncating:
            floor += sum(max(1, len(cell.split())) for cells in table.values() for cell in cells)
        if floor > self.max_len:
            raise InvalidRequest(self._too_long(f"at least {floor}", truncating), param="inputs")
        return _Item(table, query, options, truncating), bool(params.sequential)

    def _too_long(self, tokens: str, truncating: bool) -> str:
        fix = "a shorter query or fewer columns" if truncating else "`truncation: true` or a smaller table"
        return f"The query and table take {tokens} tokens, over the model's {self.max_len}; send {fix}."

    def run(self, items: list[_Item], key: Hashable) -> list[Any]:
        import pandas as pd

        encoded = []
        for item in items:
            inputs = self.pipe.preprocess({"table": pd.DataFrame(item.table), "query": item.query}, **item.options)
            table = inputs.pop("table")
            length = int(inputs["input_ids"].shape[1])
            if length > self.max_len:  # the pipeline would run it, past the positions the model was trained on
                raise InvalidRequest(self._too_long(str(length), item.truncating), param="inputs")
            encoded.append((dict(inputs), table))
        outputs: list[tuple[Any, Any]] = []
        if key:  # sequential: one at a time
            outputs = [self._forward([inputs], sequential=True)[0] for inputs, _ in encoded]
        else:
            outputs = [(None, None)] * len(encoded)
            for group in self._groups([inputs for inputs, _ in encoded]):
                for i, out in zip(group, self._forward([encoded[i][0] for i in group], sequential=False), strict=True):
                    outputs[i] = out
        return [self._answer(inputs, table, out) for (inputs, table), out in zip(encoded, outputs, strict=True)]

    def _groups(self, encoded: list[dict[str, Any]]) -> list[list[int]]:
        """Indices of the items to forward together: all of them, or those of one length where padding may matter."""
        if self.pad_freely:
            return [list(range(len(encoded)))]
        by_length: dict[int, list[int]] = {}
        for i, inputs in enumerate(encoded):
            by_length.setdefault(int(inputs["input_ids"].shape[1]), []).append(i)
        return list(by_length.values())

    def _forward(self, batch: list[dict[str, Any]], sequential: bool) -> list[tuple[Any, Any]]:
        """(token logits, aggregation logits or None) per item, on CPU in float32, each cut to its own length."""
        torch = self.torch
        lengths = [int(inputs["input_ids"].shape[1]) for inputs in batch]
        longest = max(lengths)

        def stack(name: str, value: int) -> Any:
            rows = []
            for inputs in batch:
                x = inputs[name]
                pad = (0, 0, 0, longest - x.shape[1]) if x.dim() == 3 else (0, longest - x.shape[1])
                rows.append(torch.nn.functional.pad(x, pad, value=value))
            return torch.cat(rows).to(self.pipe.device)

        stacked = {"input_ids": stack("input_ids", self.pad_id), "attention_mask": stack("attention_mask", 0),
                   "token_type_ids": stack("token_type_ids", 0)}
        with torch.inference_mode():
            out = self.pipe.sequential_inference(**stacked) if sequential else self.pipe.batch_inference(**stacked)
        logits, aggregation = out[0], (out[1] if self.pipe.aggregate else None)
        return [(logits[i:i + 1, :n].float().cpu(), None if aggregation is None else aggregation[i:i + 1].float().cpu())
                for i, n in enumerate(lengths)]

    def _answer(self, inputs: dict[str, Any], table: Any, out: tuple[Any, Any]) -> dict[str, Any]:
        logits, aggregation = out
        outputs = (logits,) if aggregation is None else (logits, aggregation)
        answer = self.pipe.postprocess({"model_inputs": inputs, "table": table, "outputs": outputs})
        shaped = {"answer": str(answer["answer"]), "coordinates": _coordinates(answer["coordinates"]),
                  "cells": [str(cell) for cell in answer["cells"]]}
        if "aggregator" in answer:
            shaped["aggregator"] = str(answer["aggregator"])
        return shaped


def load(spec: LoadSpec) -> MediaModel:
    return TableQA(spec)
