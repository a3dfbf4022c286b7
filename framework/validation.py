"""Turn validated wire types into engine inputs, refusing anything the engine must never see.

`framework.types` checks what a value means on its own (a negative learning rate, a negative
token id); this module checks it against the model and the loss: token ids within the vocabulary,
every input the loss reads present with the input's length, the sequence within the context
length. Each error is a `ValueError` naming the field (with the datum's index) and the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from framework import types
from framework.engine import DatumArrays
from framework.losses import LOSSES, check_loss_inputs


def check_tokens(field: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        raise ValueError(f"{field} is empty; it needs at least one token")
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{field}[{i}] = {int(tokens[i])} is outside the vocabulary [0, {vocab_size})")


def datums_to_arrays(
    data: Sequence[types.Datum], loss_fn: str, loss_fn_config: dict | None, *, vocab_size: int, max_seq_len: int,
    required_keys: Sequence[str] | None = None,
) -> tuple[list[DatumArrays], dict[str, float]]:
    """Engine inputs for a `forward`/`forward_backward` request, and the loss config with defaults.

    `required_keys` overrides the loss's input keys (a custom loss reads only `target_tokens`).
    """
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        raise ValueError(f"data must be a list of Datum, got {type(data).__name__}")
    if not data:
        raise ValueError("data is empty; forward_backward needs at least one Datum")
    if loss_fn not in LOSSES:
        raise ValueError(f"unknown loss_fn {loss_fn!r}; valid: {', '.join(sorted(LOSSES))}")
    keys = LOSSES[loss_fn].input_keys if required_keys is None else tuple(required_keys)
    config: dict[str, float] | None = None
    out = []
    for i, datum in enumerate(data):
        if not isinstance(datum, types.Datum):
            raise ValueError(f"data[{i}] must be a Datum, got {type(datum).__name__}")
        if required_keys is None:
            config = config or check_loss_inputs(loss_fn, datum.loss_fn_inputs.keys(), loss_fn_config)
        else:
            missing = [k for k in keys if k not in datum.loss_fn_inputs]
            if missing:
                raise ValueError(f"data[{i}].loss_fn_inputs lacks {missing}")
        tokens = np.asarray(datum.model_input.to_ints(), np.int64)
        check_tokens(f"data[{i}].model_input", tokens, vocab_size)
        if len(tokens) > max_seq_len:
            raise ValueError(f"data[{i}].model_input has {len(tokens)} tokens; the maximum is {max_seq_len}")
        inputs = {}
        for key in keys:
            array = np.asarray(datum.loss_fn_inputs[key].to_numpy()).reshape(-1)
            if array.shape[0] != len(tokens):
                raise ValueError(f"data[{i}].loss_fn_inputs[{key!r}] has length {array.shape[0]}; "
                                 f"model_input has {len(tokens)} tokens")
            if key == "target_tokens":
                check_tokens(f"data[{i}].loss_fn_inputs['target_tokens']", array, vocab_size)
                inputs[key] = array.astype(np.int32)
            else:
                inputs[key] = array.astype(np.float32)
        out.append(DatumArrays(tokens.astype(np.int32), inputs))
    return out, config or {}
