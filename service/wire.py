"""Protobuf ⇄ `framework.types`, exactly as the SDK 0.38 writes and reads them.

In: `ForwardBackwardRequest` (the SDK always sends forward/backward as protobuf): token chunks are
int32 bytes, loss inputs are `Tensor`s (dense bytes or sparse CSR) whose dtype says how to read
them. Out: `ForwardBackwardOutput` (per-datum outputs packed in one `ArrayRecord` of
`BatchedTensor`s: the datums' values concatenated, with int64 *byte* offsets) and `SampleResponse`
(tokens int32, logprobs float32; a missing logprob is NaN; missing top-k rows are filled with the
SDK's sentinel token 0 / logprob -99999). Every decoding error is a `BadRequest` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from framework import types
from service import pb
from service.errors import BadRequest, from_validation_error

MASK_LOGPROB = -99999.0  # the SDK's sentinel for "no top-k entry here" (tinker.types.topk_logprobs)

_NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_PUBLIC = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_INT64: "int64", pb.DTYPE_INT32: "int64", pb.DTYPE_BFLOAT16: "float32"}


@dataclasses.dataclass(frozen=True)
class ForwardBackwardCall:
    model_id: str
    seq_id: int | None
    forward_only: bool
    loss_fn: str
    loss_fn_config: dict[str, float] | None
    data: list[types.Datum]


def _frombuffer(raw: bytes, dtype: Any, field: str) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise BadRequest(f"{field}: {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values")
    return np.frombuffer(raw, dtype=dtype)


def _tensor(msg: Any, field: str) -> types.TensorData:
    if msg.dtype not in _PUBLIC:
        raise BadRequest(f"{field}.dtype: unsupported protobuf dtype {msg.dtype}; send float32 or int64")
    public = _PUBLIC[msg.dtype]
    shape = [int(d) for d in msg.shape] or None
    if msg.dtype == pb.DTYPE_BFLOAT16:
        def read(raw: bytes) -> np.ndarray:
            return (_frombuffer(raw, np.uint16, field).astype(np.uint32) << 16).view(np.float32)
    else:
        def read(raw: bytes) -> np.ndarray:
            return _frombuffer(raw, _NUMPY[msg.dtype], field)
    try:
        if msg.HasField("sparse_csr"):
            csr = msg.sparse_csr
            return types.TensorData(
                data=read(csr.values).tolist(), dtype=public, shape=shape,
                sparse_crow_indices=_frombuffer(csr.crow_indices, np.int64, field + ".crow_indices").tolist(),
                sparse_col_indices=_frombuffer(csr.col_indices, np.int64, field + ".col_indices").tolist())
        return types.TensorData(data=read(msg.dense).tolist(), dtype=public, shape=shape)
    except ValidationError as error:
        raise from_validation_error(error, field) from None


def _model_input(chunks: Any, field: str) -> types.ModelInput:
    out = []
    for j, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise BadRequest(f"{field}[{j}]: {kind or 'empty'} chunks are not supported; this server serves "
                             "text models (encoded_text chunks only)")
        tokens = _frombuffer(chunk.encoded_text.tokens, np.int32, f"{field}[{j}].tokens")
        try:
            out.append(types.EncodedTextChunk(tokens=tokens.tolist()))
        except ValidationError as error:
            raise from_validation_error(error, f"{field}[{j}]") from None
    return types.ModelInput(chunks=out)


def _loss_config(msg: Any) -> dict[str, float] | None:
    if msg.loss_fn_config_v2:  # the SDK writes both; v2 wins (it also carries strings)
        config: dict[str, float] = {}
        for key, value in msg.loss_fn_config_v2.items():
            if value.WhichOneof("value") != "number":
                raise BadRequest(f"loss_fn_config[{key!r}]: must be a number (no loss here takes text options)")
            config[key] = value.number
        return config
    return dict(msg.loss_fn_config) or None


def decode_forward_backward(body: bytes) -> ForwardBackwardCall:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except DecodeError as error:
        raise BadRequest(f"body: not a tinker_public.ForwardBackwardRequest protobuf ({error})") from None
    if not msg.model_id:
        raise BadRequest("model_id: missing")
    try:
        data = [_datum(datum, f"data[{i}]") for i, datum in enumerate(msg.data)]
        config = _loss_config(msg)
    except BadRequest as error:
        error.numbered = (msg.model_id, msg.seq_id)  # the request is known: its seq_id counts as used
        raise
    return ForwardBackwardCall(model_id=msg.model_id, seq_id=msg.seq_id or None, forward_only=msg.forward_only,
                               loss_fn=msg.loss_fn, loss_fn_config=config, data=data)


def _datum(datum: Any, field: str) -> types.Datum:
    model_input = _model_input(datum.model_input, f"{field}.model_input")
    inputs = {key: _tensor(t, f"{field}.loss_fn_inputs[{key!r}]") for key, t in datum.loss_fn_inputs.items()}
    try:
        return types.Datum(model_input=model_input, loss_fn_inputs=inputs)
    except ValidationError as error:
        raise from_validation_error(error, field) from None


def encode_forward_backward(call: ForwardBackwardCall) -> bytes:
    """The SDK's encoding of a request (tests and our own tools use it; the server only decodes)."""
    msg = pb.ForwardBackwardRequest(model_id=call.model_id, seq_id=call.seq_id or 0, loss_fn=call.loss_fn,
                                    forward_only=call.forward_only)
    for key, value in (call.loss_fn_config or {}).items():
        msg.loss_fn_config[key] = float(value)
        msg.loss_fn_config_v2[key].number = float(value)
    for datum in call.data:
        d = msg.data.add()
        for chunk in datum.model_input.chunks:
            d.model_input.add().encoded_text.tokens = np.asarray(chunk.tokens, np.int32).tobytes()
        for key, tensor in datum.loss_fn_inputs.items():
            t = d.loss_fn_inputs[key]
            t.dtype = pb.DTYPE_FLOAT32 if tensor.dtype == "float32" else pb.DTYPE_INT64
            t.shape.extend(tensor.shape or [len(tensor.data)])
            t.dense = np.asarray(tensor.data, np.float32 if tensor.dtype == "float32" else np.int64).tobytes()
    return msg.SerializeToString()


# ------------------------------------------------------------------------------------- outputs
def encode_forward_backward_output(out: types.ForwardBackwardOutput) -> bytes:
    msg = pb.ForwardBackwardOutput(loss_fn_output_type=out.loss_fn_output_type or "ArrayRecord")
    for key, value in out.metrics.items():
        msg.metrics[key] = float(value)
    if out.loss_fn_outputs:
        record = msg.loss_fn_outputs.add(num_datums=len(out.loss_fn_outputs))
        for name in out.loss_fn_outputs[0]:
            arrays = [o[name].to_numpy() for o in out.loss_fn_outputs]
            floats = arrays[0].dtype.kind == "f"
            dtype = np.float32 if floats else np.int64
            flat = [np.ascontiguousarray(a, dtype).reshape(-1) for a in arrays]
            sizes = np.cumsum([0] + [a.nbytes for a in flat], dtype=np.int64)
            bt = record.fields[name]
            bt.data = b"".join(a.tobytes() for a in flat)
            bt.offsets = sizes.tobytes()
            bt.dtype = pb.DTYPE_FLOAT32 if floats else pb.DTYPE_INT64
            bt.trailing_shape.extend(list(arrays[0].shape[1:]))
    return msg.SerializeToString()


def _nan_for_none(values: list[float | None]) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in values], np.float32)


def _topk(rows: list[list[tuple[int, float]] | None], k: int) -> Any:
    ids = np.zeros((len(rows), k), np.int32)
    lps = np.full((len(rows), k), MASK_LOGPROB, np.float32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate((row or [])[:k]):
            ids[i, j], lps[i, j] = token, logprob
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=len(rows))


def encode_sample_response(resp: types.SampleResponse, *, topk_prompt: int = 0, topk_sample: int = 0) -> bytes:
    msg = pb.SampleResponse(prompt_cache_hit_tokens=resp.prompt_cache_hit_tokens)
    for seq in resp.sequences:
        s = msg.sequences.add(stop_reason=pb.STOP_REASON[seq.stop_reason],
                              tokens=np.asarray(seq.tokens, np.int32).tobytes())
        if seq.logprobs is not None:
            s.logprobs = np.asarray(seq.logprobs, np.float32).tobytes()
        if topk_sample and seq.topk_logprobs is not None:
            s.topk_sampled_logprobs.CopyFrom(_topk(seq.topk_logprobs, topk_sample))
    if resp.prompt_logprobs is not None:
        msg.prompt_logprobs = _nan_for_none(resp.prompt_logprobs).tobytes()
    if topk_prompt and resp.topk_prompt_logprobs is not None:
        msg.topk_prompt_logprobs.CopyFrom(_topk(resp.topk_prompt_logprobs, topk_prompt))
    return msg.SerializeToString()


def decode_forward_backward_output(raw: bytes) -> types.ForwardBackwardOutput:
    """Inverse of `encode_forward_backward_output`: serves a proto result to a client that asked for JSON."""
    msg = pb.ForwardBackwardOutput()
    msg.ParseFromString(raw)
    outputs: list[dict[str, types.TensorData]] = [{} for _ in range(sum(r.num_datums for r in msg.loss_fn_outputs))]
    start = 0
    for record in msg.loss_fn_outputs:
        for name, bt in record.fields.items():
            dtype = np.float32 if bt.dtype == pb.DTYPE_FLOAT32 else np.int64
            buf, offsets = np.frombuffer(bt.data, np.uint8), np.frombuffer(bt.offsets, np.int64)
            for i in range(record.num_datums):
                values = buf[offsets[i]: offsets[i + 1]].view(dtype)
                shape = [len(values) // max(1, math.prod(bt.trailing_shape)), *bt.trailing_shape]
                outputs[start + i][name] = types.TensorData.from_numpy(values.reshape(shape))
        start += record.num_datums
    return types.ForwardBackwardOutput(loss_fn_output_type=msg.loss_fn_output_type, loss_fn_outputs=outputs,
                                       metrics=dict(msg.metrics))


def decode_sample_response(raw: bytes) -> types.SampleResponse:
    """Inverse of `encode_sample_response` (top-k rows included), for JSON clients."""
    msg = pb.SampleResponse()
    msg.ParseFromString(raw)
    reasons = {v: k for k, v in pb.STOP_REASON.items()}

    def topk(t: Any) -> list[list[tuple[int, float]] | None]:
        ids = np.frombuffer(t.token_ids, np.int32).reshape(t.length, t.k)
        lps = np.frombuffer(t.logprobs, np.float32).reshape(t.length, t.k)
        rows: list[list[tuple[int, float]] | None] = []
        for i in range(t.length):
            row = [(int(a), float(b)) for a, b in zip(ids[i], lps[i], strict=True) if b != MASK_LOGPROB]
            rows.append(row or None)
        return rows

    sequences = [types.SampledSequence(
        stop_reason=reasons[s.stop_reason], tokens=np.frombuffer(s.tokens, np.int32).tolist(),
        logprobs=np.frombuffer(s.logprobs, np.float32).tolist() if s.HasField("logprobs") else None,
        topk_logprobs=topk(s.topk_sampled_logprobs) if s.HasField("topk_sampled_logprobs") else None)
        for s in msg.sequences]
    prompt = None
    if msg.HasField("prompt_logprobs"):
        prompt = [None if math.isnan(x) else float(x) for x in np.frombuffer(msg.prompt_logprobs, np.float32)]
    return types.SampleResponse(
        sequences=sequences, prompt_logprobs=prompt, prompt_cache_hit_tokens=msg.prompt_cache_hit_tokens,
        topk_prompt_logprobs=topk(msg.topk_prompt_logprobs) if msg.HasField("topk_prompt_logprobs") else None)
