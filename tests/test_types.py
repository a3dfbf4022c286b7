"""`framework.types` against the official `tinker` SDK: same names, fields and defaults, JSON that
each side parses, working helpers, and validation errors that name the field and the value."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from datetime import UTC, datetime

import jax.numpy as jnp
import numpy as np
import pydantic
import pytest
import tinker.types as sdk
import torch
from pydantic_core import to_jsonable_python
from tinker.types._pydantic_types.datum import Datum as SdkWireDatum
from tinker.types._pydantic_types.tensor_data import TensorData as SdkWireTensorData

from framework import types

# Every type we mirror, by its SDK name.
MIRRORED = [
    "EncodedTextChunk",
    "ModelInput",
    "TensorData",
    "Datum",
    "AdamParams",
    "AdamOptimizerConfig",
    "LoraConfig",
    "SamplingParams",
    "SampledSequence",
    "SampleResponse",
    "ForwardBackwardOutput",
    "OptimStepResponse",
    "SaveWeightsResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsForSamplerResponseInternal",
    "LoadWeightsResponse",
    "ModelData",
    "GetInfoResponse",
    "SupportedModel",
    "GetServerCapabilitiesResponse",
    "Checkpoint",
    "ParsedCheckpointTinkerPath",
    "Cursor",
    "CheckpointsListResponse",
    "TrainingRun",
    "TrainingRunsResponse",
    "WeightsInfoResponse",
]

# SDK attributes we leave out on purpose, with the reason.
NOT_MIRRORED = {
    ("Datum", "model_input_spans"): "provenance spans: an SDK billing/attribution feature",
    ("Datum", "loss_fn_input_spans"): "provenance spans",
    ("Datum", "with_provenance"): "provenance spans",
    ("SampledSequence", "topk_logprobs_np"): "top-k arrays: ours is the list form only",
    ("SampleResponse", "topk_prompt_logprobs_np"): "top-k arrays: ours is the list form only",
    ("SampleResponse", "target_prompt_logprobs"): "SampleRequest.target_prompt_logprobs: not implemented",
    ("SampleResponse", "prompt_alt_tokens"): "SampleRequest.prompt_alt_tokens_k: not implemented",
    ("TensorData", "from_torch"): "no torch at runtime; from_numpy / from_jax instead",
    ("TensorData", "from_torch_sparse"): "no torch at runtime",
    ("TensorData", "to_torch"): "no torch at runtime; to_numpy / to_jax instead",
    ("SaveWeightsResponse", "get_console_url"): "Thinking Machines' web console",
    ("SaveWeightsForSamplerResponse", "get_console_url"): "Thinking Machines' web console",
    ("SaveWeightsForSamplerResponse", "get_playground_url"): "Thinking Machines' web console",
}

# SDK-required fields that are optional in ours (the SDK client fills them in itself).
OPTIONAL_IN_OURS = {("SampledSequence", "sequence_id")}


_METHOD = object()


def _sdk_attributes(cls: type) -> dict[str, typing.Any]:
    """Public fields (name -> default, or `inspect.Parameter.empty`) and public methods/properties
    (name -> `_METHOD`) of an SDK type, pydantic model or dataclass."""
    out: dict[str, typing.Any] = {}
    if issubclass(cls, pydantic.BaseModel):
        for name, info in cls.model_fields.items():
            out[name] = inspect.Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
        base_attrs = set(dir(pydantic.BaseModel))
    else:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = inspect.Parameter.empty
        base_attrs = set(dir(object))
    for name in dir(cls):
        if not name.startswith("_") and name not in out and name not in base_attrs:
            out[name] = _METHOD
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _normalise(value: typing.Any) -> typing.Any:
    return value.model_dump() if isinstance(value, pydantic.BaseModel) else value


@pytest.mark.parametrize("name", MIRRORED)
def test_every_sdk_field_and_method_exists_with_the_same_default(name: str) -> None:
    ours, theirs = getattr(types, name), getattr(sdk, name)
    for attr, sdk_default in _sdk_attributes(theirs).items():
        if (name, attr) in NOT_MIRRORED:
            continue
        assert hasattr(ours, attr) or attr in ours.model_fields, f"{name}.{attr} is missing"
        field = ours.model_fields.get(attr)
        if field is None or sdk_default is _METHOD:
            continue  # a method or property on either side
        if sdk_default is inspect.Parameter.empty:
            assert field.is_required() or (name, attr) in OPTIONAL_IN_OURS, f"{name}.{attr} should be required"
        else:
            assert not field.is_required(), f"{name}.{attr} should default to {sdk_default!r}"
            ours_default = field.get_default(call_default_factory=True)
            assert _normalise(ours_default) == _normalise(sdk_default), f"{name}.{attr} default"


def test_literal_aliases_agree_with_the_sdk() -> None:
    assert set(typing.get_args(types.LossFnType)) <= set(typing.get_args(sdk.LossFnType))
    assert typing.get_args(types.StopReason) == typing.get_args(sdk.StopReason)
    assert set(typing.get_args(types.TensorDtype)) == set(typing.get_args(sdk.tensor_data.TensorDtype))
    assert set(typing.get_args(types.CheckpointType)) == set(typing.get_args(sdk.CheckpointType))


# ---------------------------------------------------------------------------------------------
# Wire compatibility: our JSON parses into the SDK's pydantic models and back.
# ---------------------------------------------------------------------------------------------


def _datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]).append_int(8),
        loss_fn_inputs={
            "target_tokens": np.array([6, 7, 8, 9]),
            "logprobs": [-0.5, -1.0, -1.5, -2.0],
            "advantages": np.full(4, 0.25, dtype=np.float64),
        },
    )


OURS_TO_SDK = [
    (_datum, SdkWireDatum),
    (lambda: types.ModelInput.from_ints([1, 2, 3]), sdk.ModelInput),
    (lambda: types.TensorData.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3)), SdkWireTensorData),
    (lambda: types.SamplingParams(max_tokens=16, seed=3, stop=["\n\n"], temperature=0.7, top_k=50), sdk.SamplingParams),
    (lambda: types.SamplingParams(stop=[13, 2]), sdk.SamplingParams),
    (lambda: types.AdamParams(learning_rate=3e-4, weight_decay=0.01, grad_clip_norm=1.0), sdk.AdamParams),
    (lambda: types.LoraConfig(rank=8, seed=1, train_unembed=False), sdk.LoraConfig),
    (lambda: types.OptimStepResponse(metrics={"grad_norm": 1.5}), sdk.OptimStepResponse),
    (lambda: types.SaveWeightsResponse(path="tinker://run/weights/0001"), sdk.SaveWeightsResponse),
    (lambda: types.LoadWeightsResponse(path="tinker://run/weights/0001", type="load_weights"), sdk.LoadWeightsResponse),
    (
        lambda: types.SaveWeightsForSamplerResponseInternal(sampling_session_id="s1"),
        sdk.SaveWeightsForSamplerResponseInternal,
    ),
    (
        lambda: types.GetInfoResponse(
            model_data=types.ModelData(arch="qwen3", model_name="Qwen3-0.6B"), model_id="m1", is_lora=True, lora_rank=8
        ),
        sdk.GetInfoResponse,
    ),
    (
        lambda: types.GetServerCapabilitiesResponse(
            supported_models=[types.SupportedModel(model_name="tiny", max_context_length=512, trainable=True)]
        ),
        sdk.GetServerCapabilitiesResponse,
    ),
    (
        lambda: types.CheckpointsListResponse(
            checkpoints=[
                types.Checkpoint(
                    checkpoint_id="weights/0001",
                    checkpoint_type="training",
                    time=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
                    tinker_path="tinker://run/weights/0001",
                    size_bytes=1024,
                )
            ],
            cursor=types.Cursor(offset=0, limit=10, total_count=1),
        ),
        sdk.CheckpointsListResponse,
    ),
]


@pytest.mark.parametrize(("make", "sdk_cls"), OURS_TO_SDK, ids=lambda x: getattr(x, "__name__", ""))
def test_our_json_parses_into_the_sdk_and_back(make, sdk_cls) -> None:
    ours = make()
    theirs = sdk_cls.model_validate_json(ours.model_dump_json())
    assert theirs.model_dump(mode="json") == ours.model_dump(mode="json")
    back = type(ours).model_validate_json(theirs.model_dump_json())
    assert back == ours


# Our fields that the SDK's type lacks, found by comparing the classes: `(type name, field name)`.
EXTENSION_FIELDS = sorted((name, field) for name in MIRRORED for field in
                          set(getattr(types, name).model_fields) - set(_sdk_attributes(getattr(sdk, name))))

# SDK objects of the mirrored types that are dataclasses in the SDK (it decodes them from protobuf, not JSON).
SDK_DATACLASS_SAMPLES: dict[str, typing.Callable[[], typing.Any]] = {
    "SampledSequence": lambda: sdk.SampledSequence(
        stop_reason="length", sequence_id="seq-0", tokens_np=np.array([4, 5], np.int32),
        logprobs_np=np.array([-0.5, -0.25], np.float32)),
}


def _value_for(annotation: typing.Any) -> typing.Any:
    """A value of the field's type that is not its default None."""
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    values = {bool: True, int: 7, float: 0.5, str: "extension"}
    assert kinds[0] in values, f"no test value for an extension of type {annotation}: add one to _value_for"
    return values[kinds[0]]


@pytest.mark.parametrize(("name", "field"), EXTENSION_FIELDS, ids=[f"{n}.{f}" for n, f in EXTENSION_FIELDS])
def test_fields_beyond_the_sdk_are_optional_and_invisible_to_it(name: str, field: str) -> None:
    """What the SDK sends parses into ours without the field; with the field set, ours keeps it through JSON,
    and the SDK still parses our JSON (a request type, which refuses unknown fields, could carry none)."""
    ours_cls = getattr(types, name)
    assert not ours_cls.model_fields[field].is_required(), f"{name}.{field} must be optional"
    if issubclass(getattr(sdk, name), pydantic.BaseModel):
        samples = [(make(), wire_cls) for make, wire_cls in OURS_TO_SDK if isinstance(make(), ours_cls)]
        assert samples, f"add an OURS_TO_SDK entry for {name}"
        sample, wire_cls = samples[0]
        theirs = wire_cls.model_validate_json(sample.model_dump_json())
        from_sdk = ours_cls.model_validate_json(theirs.model_dump_json())
    else:
        assert name in SDK_DATACLASS_SAMPLES, f"add an SDK_DATACLASS_SAMPLES entry for {name}"
        theirs = SDK_DATACLASS_SAMPLES[name]()
        from_sdk = ours_cls.model_validate({f: getattr(theirs, f) for f in ours_cls.model_fields if hasattr(theirs, f)})
    assert getattr(from_sdk, field) is None

    value = _value_for(ours_cls.model_fields[field].annotation)
    extended = ours_cls.model_validate({**from_sdk.model_dump(), field: value})
    assert getattr(ours_cls.model_validate_json(extended.model_dump_json()), field) == value
    if isinstance(theirs, pydantic.BaseModel):
        assert wire_cls.model_validate_json(extended.model_dump_json()) == theirs


def test_sdk_built_objects_parse_into_ours() -> None:
    sdk_datum = SdkWireDatum(
        model_input=sdk.ModelInput.from_ints([3, 4, 5]),
        loss_fn_inputs={"target_tokens": np.array([4, 5, 6]), "weights": [0.0, 1.0, 1.0]},
    )
    ours = types.Datum.model_validate_json(sdk_datum.model_dump_json())
    assert ours.model_input.to_ints() == [3, 4, 5]
    np.testing.assert_array_equal(ours.loss_fn_inputs["target_tokens"].to_numpy(), [4, 5, 6])
    assert ours.loss_fn_inputs["weights"].dtype == "float32"
    for params in (
        sdk.SamplingParams(max_tokens=5, temperature=0.0, top_p=0.9),
        sdk.AdamParams(),
        sdk.LoraConfig(rank=4),
    ):
        parsed = getattr(types, type(params).__name__).model_validate_json(params.model_dump_json())
        assert parsed.model_dump() == params.model_dump()


def test_sdk_sparse_tensors_densify_the_same_way() -> None:
    dense = torch.tensor([[5, -1, -1, -1, -1, -1], [-1, -1, 7, 8, -1, -1], [-1] * 6, [-1, -1, -1, -1, -1, 2]])
    sparse = SdkWireTensorData.from_torch_sparse(dense, pad_value=-1)
    assert sparse.sparse_crow_indices is not None  # the SDK chose the sparse layout
    ours = types.TensorData.model_validate_json(sparse.model_dump_json())
    np.testing.assert_array_equal(ours.to_numpy(pad_value=-1), dense.numpy())
    np.testing.assert_array_equal(ours.to_numpy(pad_value=-1), sparse.to_numpy(pad_value=-1))


def test_datum_json_round_trip() -> None:
    datum = _datum()
    again = types.Datum.model_validate_json(datum.model_dump_json())
    assert again == datum
    assert again.loss_fn_inputs["target_tokens"].dtype == "int64"
    np.testing.assert_allclose(again.loss_fn_inputs["advantages"].to_numpy(), 0.25)


def test_responses_ignore_unknown_fields_and_requests_refuse_them() -> None:
    seq = types.SampledSequence.model_validate({"stop_reason": "stop", "tokens": [1], "future_field": 1})
    assert seq.tokens == [1]
    with pytest.raises(pydantic.ValidationError, match="learning_rat"):
        types.AdamParams.model_validate({"learning_rat": 1e-4})
    # Our extension is optional: the SDK-shaped JSON parses without it, and it round-trips when set.
    assert types.SampledSequence.model_validate({"stop_reason": "stop", "tokens": [1]}).weights_version is None
    ours = types.SampledSequence(stop_reason="length", tokens=[1, 2], logprobs=[-0.1, -0.2], weights_version=3)
    assert types.SampledSequence.model_validate_json(ours.model_dump_json()).weights_version == 3


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_model_input_helpers() -> None:
    mi = types.ModelInput.from_ints([1, 2, 3])
    assert mi.length == 3 and mi.to_ints() == [1, 2, 3]
    longer = mi.append(types.EncodedTextChunk(tokens=[4, 5])).append_int(6)
    assert longer.to_ints() == [1, 2, 3, 4, 5, 6] and longer.length == 6 and len(longer.chunks) == 3
    assert mi.to_ints() == [1, 2, 3]  # append returns a new object
    assert types.ModelInput.empty().length == 0 and types.ModelInput.empty().to_ints() == []
    assert types.ModelInput.from_ints(np.array([7, 8])).to_ints() == [7, 8]
    assert types.ModelInput.from_ints(jnp.array([9])).to_ints() == [9]
    assert types.EncodedTextChunk(tokens=[1, 2]).length == 2
    with pytest.raises(pydantic.ValidationError):
        mi.chunks = []  # frozen, as in the SDK


def test_tensor_data_numpy_and_jax_round_trips() -> None:
    ints = np.arange(12, dtype=np.int32).reshape(3, 4)
    td = types.TensorData.from_numpy(ints)
    assert td.dtype == "int64" and td.shape == [3, 4] and td.data == list(range(12))
    out = td.to_numpy()
    assert out.dtype == np.int64 and out.shape == (3, 4)
    np.testing.assert_array_equal(out, ints)
    assert td.tolist() == ints.tolist()

    floats = types.TensorData.from_numpy(np.linspace(0, 1, 5))  # float64 narrows to float32
    assert floats.dtype == "float32" and floats.to_numpy().dtype == np.float32

    bf16 = types.TensorData.from_jax(jnp.array([[0.5, 1.5]], dtype=jnp.bfloat16))
    assert bf16.dtype == "float32" and bf16.shape == [1, 2] and bf16.data == [0.5, 1.5]
    back = bf16.to_jax()
    assert back.dtype == jnp.float32 and back.shape == (1, 2)

    no_shape = types.TensorData(data=[1.0, 2.0], dtype="float32")
    assert no_shape.to_numpy().shape == (2,)
    with pytest.raises(ValueError, match="dtype"):
        types.TensorData.from_numpy(np.array(["a"]))


def test_datum_converts_arrays_and_lists_like_the_sdk() -> None:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={
            "target_tokens": np.array([2.0, 3.0, 4.0]),  # integral floats become int64 ids
            "weights": [1, 0, 1],  # ints for a float key become float32
            "advantages": jnp.array([0.5, 0.5, 0.5]),
            "my_extra": [1, 2, 3],  # unknown keys keep their kind
        },
    )
    dtypes = {k: v.dtype for k, v in datum.loss_fn_inputs.items()}
    assert dtypes == {"target_tokens": "int64", "weights": "float32", "advantages": "float32", "my_extra": "int64"}
    assert datum.loss_fn_inputs["weights"].data == [1.0, 0.0, 1.0]
    sdk_datum = sdk.Datum(model_input=sdk.ModelInput.from_ints([1, 2, 3]), loss_fn_inputs={"weights": [1, 0, 1]})
    assert sdk_datum.loss_fn_inputs["weights"].dtype == "float32"  # same rule in the SDK


def test_sampling_and_checkpoint_helpers() -> None:
    seq = types.SampledSequence(stop_reason="stop", tokens=[4, 5], logprobs=[-0.5, -0.25])
    assert seq.tokens_np.dtype == np.int32 and seq.tokens_np.tolist() == [4, 5]
    assert seq.logprobs_np is not None and seq.logprobs_np.dtype == np.float32
    assert types.SampledSequence(stop_reason="length", tokens=[]).logprobs_np is None
    resp = types.SampleResponse(sequences=[seq], prompt_logprobs=[None, -1.0])
    lp = resp.prompt_logprobs_np
    assert lp is not None and math.isnan(lp[0]) and lp[1] == -1.0

    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path("tinker://run-1/sampler_weights/step-10")
    expected = sdk.ParsedCheckpointTinkerPath.from_tinker_path("tinker://run-1/sampler_weights/step-10")
    assert parsed.model_dump() == expected.model_dump()
    for bad in ("http://run/weights/x", "tinker://run/weights", "tinker://run/other/x"):
        with pytest.raises(ValueError, match="tinker_path"):
            types.ParsedCheckpointTinkerPath.from_tinker_path(bad)


# ---------------------------------------------------------------------------------------------
# Validation: every error names its field and the offending value.
# ---------------------------------------------------------------------------------------------

_MI = types.ModelInput.from_ints([1, 2])

INVALID = [
    (lambda: types.AdamParams(learning_rate=-1e-4), "learning_rate", "-0.0001"),
    (lambda: types.AdamParams(learning_rate=float("inf")), "learning_rate", "inf"),
    (lambda: types.AdamParams(learning_rate=float("nan")), "learning_rate", "nan"),
    (lambda: types.AdamParams(beta1=1.0), "beta1", "1.0"),
    (lambda: types.AdamParams(beta2=-0.5), "beta2", "-0.5"),
    (lambda: types.AdamParams(beta1=0.99999999), "beta1", "0.99999999"),  # 1.0 in float32: 0/0 in the step
    (lambda: types.AdamParams(beta2=0.99999998), "beta2", "float32"),
    (lambda: types.AdamParams(eps=-1e-8), "eps", "-1e-08"),
    (lambda: types.AdamParams(weight_decay=-0.1), "weight_decay", "-0.1"),
    (lambda: types.AdamParams(grad_clip_norm=-1.0), "grad_clip_norm", "-1.0"),
    (lambda: types.LoraConfig(rank=0), "rank", "0"),
    (lambda: types.LoraConfig(rank=-8), "rank", "-8"),
    (lambda: types.LoraConfig(rank=4, train_attn=False, train_mlp=False, train_unembed=False), "train_attn", "False"),
    (lambda: types.SamplingParams(max_tokens=0), "max_tokens", "0"),
    (lambda: types.SamplingParams(temperature=-0.5), "temperature", "-0.5"),
    (lambda: types.SamplingParams(temperature=float("nan")), "temperature", "nan"),
    (lambda: types.SamplingParams(top_p=0.0), "top_p", "0.0"),
    (lambda: types.SamplingParams(top_p=1.5), "top_p", "1.5"),
    (lambda: types.SamplingParams(top_k=0), "top_k", "0"),
    (lambda: types.SamplingParams(top_k=-2), "top_k", "-2"),
    (lambda: types.SamplingParams(stop=""), "stop", "''"),
    (lambda: types.SamplingParams(stop=[5, -1]), "stop", "-1"),
    (lambda: types.ModelInput.from_ints([1, -2, 3]), "tokens", "-2"),
    (lambda: types.EncodedTextChunk(tokens=[-7]), "tokens", "-7"),
    (lambda: types.Datum(model_input=types.ModelInput.empty()), "model_input", "empty"),
    (lambda: types.TensorData(data=[1.0, 2.0, 3.0], dtype="float32", shape=[2, 2]), "shape", "[2, 2]"),
    (lambda: types.TensorData(data=[1, 2], dtype="int64", shape=[-1, -2]), "shape", "[-1, -2]"),
    (lambda: types.TensorData(data=[1.5], dtype="int64"), "data", "non-integral"),
    (
        lambda: types.TensorData(data=[1], dtype="int64", shape=[2, 2], sparse_crow_indices=[0, 1, 1]),
        "sparse_col_indices",
        "None",
    ),
    (
        lambda: types.TensorData(
            data=[1], dtype="int64", shape=[2, 2], sparse_crow_indices=[0, 1, 1], sparse_col_indices=[5]
        ),
        "sparse_col_indices",
        "[5]",
    ),
    (
        lambda: types.Datum(model_input=_MI, loss_fn_inputs={"target_tokens": [3, -1]}),
        "loss_fn_inputs['target_tokens']",
        "-1",
    ),
    (
        lambda: types.Datum(model_input=_MI, loss_fn_inputs={"target_tokens": [1.5, 2.0]}),
        "loss_fn_inputs['target_tokens']",
        "non-integral",
    ),
    (
        lambda: types.Datum(model_input=_MI, loss_fn_inputs={"weights": [1.0, 1.0, 1.0]}),
        "loss_fn_inputs['weights']",
        "[3]",
    ),
    (
        lambda: types.Datum(model_input=_MI, loss_fn_inputs={"advantages": [0.0, float("nan")]}),
        "loss_fn_inputs['advantages']",
        "non-finite",
    ),
    (
        lambda: types.Datum(model_input=_MI, loss_fn_inputs={"weights": [[1.0], [2.0, 3.0]]}),
        "loss_fn_inputs['weights']",
        "rectangular",
    ),
    (lambda: types.Datum(model_input=_MI, loss_fn_inputs={"weights": "abc"}), "loss_fn_inputs['weights']", "str"),
]


@pytest.mark.parametrize(("make", "field", "value"), INVALID, ids=[f"{f}={v}" for _, f, v in INVALID])
def test_validation_errors_name_the_field_and_value(make, field: str, value: str) -> None:
    with pytest.raises((ValueError, TypeError)) as excinfo:
        make()
    message = str(excinfo.value)
    assert field in message, message
    assert value in message, message


EDGE_VALUES = [
    (types.AdamParams, dict(learning_rate=0.0, beta1=0.0, beta2=0.0, eps=0.0, weight_decay=0.0, grad_clip_norm=0.0),
     sdk.AdamParams),
    (types.SamplingParams, dict(max_tokens=1, temperature=0.0, top_p=1.0, top_k=1, stop=[]), sdk.SamplingParams),
    (types.SamplingParams, dict(stop="</s>"), sdk.SamplingParams),
    (types.SamplingParams, dict(stop=[0]), sdk.SamplingParams),
    (types.LoraConfig, dict(rank=1, train_attn=False, train_mlp=False), sdk.LoraConfig),
    (types.ModelInput, dict(chunks=[types.EncodedTextChunk(tokens=[0])]), sdk.ModelInput),
    (types.Datum, dict(model_input=types.ModelInput.from_ints([0])), SdkWireDatum),
]


@pytest.mark.parametrize(("cls", "values", "sdk_cls"), EDGE_VALUES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(EDGE_VALUES)])
def test_valid_edge_values_are_kept_through_the_sdk(cls, values: dict, sdk_cls) -> None:
    """The boundary of every range is accepted and kept as given (not replaced by a default, not normalised)
    by ours, by the SDK that parses our JSON, and by ours parsing the SDK's JSON back.
    (That the values also work: greedy sampling in test_sampling, eps=0 and lr=0 steps in test_lora.)"""
    ours = cls(**values)
    theirs = sdk_cls.model_validate_json(ours.model_dump_json())
    back = cls.model_validate_json(theirs.model_dump_json())
    assert back == ours
    for name, value in values.items():
        for obj in (ours, theirs, back):
            kept = getattr(obj, name)
            assert to_jsonable_python(kept) == to_jsonable_python(value), (type(obj), name, kept)
            if not isinstance(value, pydantic.BaseModel):
                assert type(kept) is type(value), (type(obj), name, kept)  # 0.0 stays a float, a str a str
