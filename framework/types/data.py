"""What a model reads and what a loss needs: `ModelInput` (chunks of token ids), `TensorData`
(dense or sparse CSR tensors) and `Datum` (one training sequence with its loss inputs)."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from framework.types._base import TensorDtype, _as_list, _check_token_ids, _error, _Request


class EncodedTextChunk(_Request):
    """A run of token ids."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @field_validator("tokens", mode="before")
    @classmethod
    def _arrays_to_lists(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("tokens")
    @classmethod
    def _non_negative(cls, tokens: list[int]) -> list[int]:
        return _check_token_ids("tokens", tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)


ModelInputChunk = EncodedTextChunk
"""The SDK's chunk union also holds image chunks; we serve text-only models."""


class ModelInput(_Request):
    """The tokens a model reads, as a list of chunks. May be empty (`ModelInput.empty()`);
    a `Datum` or a sampling prompt refuses an empty one."""

    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        """A new `ModelInput` with `chunk` added at the end."""
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new `ModelInput` with one token added at the end."""
        return self.append(EncodedTextChunk(tokens=[token]))


# ---------------------------------------------------------------------------------------------
# Tensors and training data
# ---------------------------------------------------------------------------------------------

_NUMPY_DTYPE: dict[str, type] = {"int64": np.int64, "float32": np.float32}


def _tensor_dtype_of(array: np.ndarray) -> TensorDtype:
    if array.dtype.kind == "f":
        return "float32"
    if array.dtype.kind in "iu":
        return "int64"
    raise ValueError(f"dtype must be a float or integer array dtype, got {array.dtype}")


class TensorData(_Request):
    """A dense tensor as a flat list plus a shape, or a 2-D sparse CSR tensor.

    Sparse (SDK layout): `data` holds the listed values, `sparse_crow_indices` the row pointers
    (rows + 1), `sparse_col_indices` the column of each value; every other entry is the
    `pad_value` given to `to_numpy`.
    """

    data: list[int] | list[float]
    dtype: TensorDtype
    shape: list[int] | None = None
    sparse_crow_indices: list[int] | None = None
    sparse_col_indices: list[int] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TensorData:
        if self.shape is not None and any(d < 0 for d in self.shape):
            raise _error("shape", self.shape, "non-negative sizes")
        floats = bool(self.data) and isinstance(self.data[0], float)
        if self.dtype == "int64" and floats and not all(float(x).is_integer() for x in self.data):
            raise _error("data", "non-integral values", "integers for dtype int64")
        if (self.sparse_crow_indices is None) != (self.sparse_col_indices is None):
            raise _error("sparse_col_indices", self.sparse_col_indices, "set together with sparse_crow_indices")
        if self.sparse_crow_indices is None:
            if self.shape is not None and math.prod(self.shape) != len(self.data):
                raise ValueError(
                    f"shape {self.shape} holds {math.prod(self.shape)} values but data has {len(self.data)}"
                )
            return self
        crow, col = self.sparse_crow_indices, self.sparse_col_indices
        assert col is not None
        if self.shape is None or len(self.shape) != 2:
            raise _error("shape", self.shape, "2-D for a sparse CSR tensor")
        rows, cols = self.shape
        if len(crow) != rows + 1 or crow[0] != 0 or any(b < a for a, b in itertools.pairwise(crow)):
            raise _error("sparse_crow_indices", crow, f"{rows + 1} non-decreasing row pointers from 0")
        if not (crow[-1] == len(col) == len(self.data)):
            raise ValueError(
                f"sparse tensor lists {crow[-1]} values in sparse_crow_indices, {len(col)} in "
                f"sparse_col_indices and {len(self.data)} in data; they must agree"
            )
        if any(not 0 <= c < cols for c in col):
            raise _error("sparse_col_indices", col, f"column indices in [0, {cols})")
        return self

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype = _tensor_dtype_of(array)
        return cls(data=array.astype(_NUMPY_DTYPE[dtype]).ravel().tolist(), dtype=dtype, shape=list(array.shape))

    @classmethod
    def from_jax(cls, array: Any) -> TensorData:
        """From a `jax.Array` (bfloat16 and other floats widen to float32)."""
        host = np.asarray(array)
        if host.dtype.kind not in "fiu":  # ml_dtypes such as bfloat16 are kind "V"
            host = host.astype(np.float32)
        return cls.from_numpy(host)

    def to_numpy(self, pad_value: int = 0) -> np.ndarray:
        """A new array of the tensor's dtype and shape; sparse entries not listed are `pad_value`."""
        np_dtype = _NUMPY_DTYPE[self.dtype]
        values = np.asarray(self.data, dtype=np_dtype)
        if self.sparse_crow_indices is None:
            return values.reshape(self.shape) if self.shape is not None else values
        if isinstance(pad_value, bool) or not isinstance(pad_value, int | np.integer):
            raise _error("pad_value", pad_value, "an integer")
        assert self.shape is not None and self.sparse_col_indices is not None
        dense = np.full(self.shape, pad_value, dtype=np_dtype)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.sparse_crow_indices))
        dense[rows, np.asarray(self.sparse_col_indices, dtype=np.int64)] = values
        return dense

    def to_jax(self, pad_value: int = 0) -> Any:
        """As a `jax.Array` (int64 becomes int32 unless jax x64 is enabled)."""
        import jax.numpy as jnp  # lazy: clients and the service import this module without jax

        return jnp.asarray(self.to_numpy(pad_value))

    def tolist(self, pad_value: int = 0) -> list[Any]:
        return self.to_numpy(pad_value).tolist()


LossFnInputs = dict[str, TensorData]
LossFnOutput = dict[str, TensorData]

# The wire dtype of known loss inputs; any other key takes the dtype of its values.
_KEY_DTYPE: dict[str, TensorDtype] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
}


def _to_tensor_data(key: str, value: Any) -> Any:
    """A loss input given as an array or a list becomes `TensorData` (what the SDK does)."""
    if isinstance(value, TensorData | dict):  # dict: the JSON form, validated by pydantic
        return value
    if not (isinstance(value, list | tuple) or hasattr(value, "__array__")):
        raise TypeError(f"loss_fn_inputs[{key!r}] must be TensorData, an array or a list, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ValueError(f"loss_fn_inputs[{key!r}] must be a rectangular numeric array") from exc
    if array.dtype.kind not in "fiub":
        raise ValueError(f"loss_fn_inputs[{key!r}] must be numeric, got dtype {array.dtype}")
    dtype = _KEY_DTYPE.get(key) or _tensor_dtype_of(array.astype(np.float32) if array.dtype.kind == "b" else array)
    if dtype == "int64" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise ValueError(f"loss_fn_inputs[{key!r}] must hold integers, got non-integral floats")
    return TensorData.from_numpy(array.astype(_NUMPY_DTYPE[dtype]))


class Datum(_Request):
    """One training sequence: the model input and the per-token tensors its loss needs.

    As in tinker, position i of every `loss_fn_inputs` tensor belongs to position i of
    `model_input` (which predicts `target_tokens[i]`), so each tensor's first dimension must
    equal `model_input.length`. Float inputs must be finite; token ids non-negative.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = {}

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert_arrays(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: _to_tensor_data(key, v) for key, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> Datum:
        length = self.model_input.length
        if length == 0:
            raise _error("model_input", "an empty ModelInput", "at least one token")
        for key, tensor in self.loss_fn_inputs.items():
            field = f"loss_fn_inputs[{key!r}]"
            shape = tensor.shape if tensor.shape is not None else [len(tensor.data)]
            if not shape or shape[0] != length:
                raise ValueError(
                    f"{field} has shape {shape}; its first dimension must equal model_input.length {length}"
                )
            values = np.asarray(tensor.data, dtype=_NUMPY_DTYPE[tensor.dtype])
            if tensor.dtype == "float32" and not np.all(np.isfinite(values)):
                raise _error(field, "non-finite values", "finite")
            if key == "target_tokens":
                if tensor.dtype != "int64":
                    raise _error(field, tensor.dtype, "int64 token ids")
                if values.size and values.min() < 0:
                    raise _error(field, int(values.min()), "non-negative token ids")
        return self
