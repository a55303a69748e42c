"""Property tests of issue #19: random safetensors headers, PEFT directories and names never
raise anything but a ``HyperLoRAError`` (at least 2,000 examples per target).

Each example is cheap (a few hundred bytes parsed, a tiny PEFT directory rewritten), so the file
runs in well under a minute; it is derandomized, so every run sees the same inputs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from hyperlora_integrations.adapters.references import LOOSE_RE, REF_RE, ReferenceSigner, strip_references
from hyperlora_integrations.adapters.store import check_name
from hyperlora_integrations.errors import HyperLoRAError, InvalidInputError
from hyperlora_integrations.lora import Adapter, AdapterMetadata, load_peft

EXAMPLES = 2000
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)
dim = st.one_of(
    st.integers(min_value=-2, max_value=6),
    st.sampled_from([2**31, 2**62, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    json_scalar,
)
offsets = st.one_of(
    st.lists(st.one_of(st.integers(-4, 80), json_scalar), min_size=2, max_size=2),
    st.text(min_size=2, max_size=2),
    json_value,
)
dtype = st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F8_E4M3", "WAT"]), json_value)
entry = st.fixed_dictionaries(
    {}, optional={"dtype": dtype, "shape": st.lists(dim, max_size=4), "data_offsets": offsets}
)
plausible_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "U8"]), "shape": st.lists(dim, max_size=3), "data_offsets": offsets}
)
metadata_value = st.one_of(
    st.dictionaries(
        st.sampled_from(["format", "scaling", "metadata", "format_version", "other"]),
        st.one_of(
            st.sampled_from(["hyperlora-adapter", "nan", "inf", "1e300", "-0.0", "2.5", "abc", "{}", '{"id": 5}']),
            json_value,
        ),
        max_size=5,
    ),
    json_value,
)
header = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(["m.A", "m.B", "x.A", "__metadata__"]), st.text(max_size=6)),
        st.one_of(entry, metadata_value, json_value),
        max_size=4,
    ),
    st.fixed_dictionaries({"__metadata__": metadata_value}),
    st.fixed_dictionaries({"x.A": plausible_entry}),
    st.fixed_dictionaries({"__metadata__": metadata_value, "m.A": plausible_entry, "m.B": plausible_entry}),
)


def _valid_blob() -> bytes:
    a = Adapter({"m": torch.ones(1, 2, 3)}, {"m": torch.ones(1, 3, 2)}, metadata=AdapterMetadata(id="x"))
    return a.to_bytes()


VALID = _valid_blob()


@st.composite
def safetensors_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["header", "header", "mutated", "length"]))
    if kind == "header":
        raw = json.dumps(draw(header), allow_nan=True).encode()
        body = draw(st.binary(max_size=96))
        return len(raw).to_bytes(8, "little") + raw + body
    data = bytearray(VALID)
    if kind == "length":
        data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        return bytes(data)
    for _ in range(draw(st.integers(1, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def test_random_safetensors_headers_raise_only_typed_errors():
    seen = {"examples": 0, "typed": 0, "loaded": 0}

    @SETTINGS
    @given(data=safetensors_bytes())
    def run(data: bytes) -> None:
        seen["examples"] += 1
        try:
            adapter = Adapter.from_bytes(data)
        except HyperLoRAError:
            seen["typed"] += 1
            return
        seen["loaded"] += 1
        assert math.isfinite(adapter.scaling) and all(torch.isfinite(t).all() for t in adapter.A.values())

    run()
    assert seen["examples"] >= EXAMPLES and seen["typed"] > EXAMPLES // 2, seen


# ---------------------------------------------------------------------- PEFT directories
PREFIX = "base_model.model.model.layers.{layer}.mlp.down_proj.lora_{which}.weight"
peft_config = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "lora_alpha": st.one_of(st.floats(allow_nan=True, allow_infinity=True), json_value),
            "r": json_value,
            "use_rslora": json_value,
            "base_model_name_or_path": st.one_of(
                st.sampled_from(["HuggingFaceTB/SmolLM2-135M-Instruct", ""]), json_value
            ),
            "target_modules": json_value,
        },
    ),
    json_value,
)


def _weight_files() -> list[bytes]:
    """A fixed pool of PEFT weight files, good and bad (built once: per example it would cost
    more than the load under test): matching pairs, lone halves, wrong ranks, vectors, ints,
    bools, NaNs, empty shapes, layer indices far beyond any model, and unrelated keys."""
    g = torch.Generator().manual_seed(0)
    files = []
    shapes = [(2, 3), (3, 2), (0, 3), (2,), (), (1, 1, 1), (4, 3)]
    for i in range(72):
        state = {}
        for layer in ([0, 1], [0], [1], [4095], [10**7], [0, 2])[i % 6]:
            for which in ("A", "B") if i % 5 else ("B",):
                shape = (
                    shapes[(i + layer + (which == "B")) % len(shapes)]
                    if i % 3 == 0
                    else ((2, 3) if which == "A" else (3, 2))
                )
                dtype = (
                    [torch.float32, torch.float16, torch.int32, torch.bool][(i // 7) % 4]
                    if i % 4 == 0
                    else torch.float32
                )
                t = torch.randn(shape, generator=g) if (i % 11) else torch.full(shape, float("nan"))
                state[PREFIX.format(layer=layer, which=which)] = t.to(dtype).contiguous()
        if i % 9 == 0:
            state["unrelated.weight"] = torch.ones(2)
        files.append(st_save(state))
    return files


WEIGHT_FILES = _weight_files()

metadata_file = st.one_of(
    st.none(), st.sampled_from(['{"source": 123}', "[]", "{", '{"id": "x"}']), json_value.map(json.dumps)
)


def test_random_peft_directories_raise_only_typed_errors(tmp_path):
    seen = {"examples": 0, "typed": 0, "loaded": 0}
    path = tmp_path / "peft"
    path.mkdir()

    @SETTINGS
    @given(config=peft_config, weights=st.sampled_from(WEIGHT_FILES), meta=metadata_file)
    def run(config, weights, meta) -> None:
        seen["examples"] += 1
        (path / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        (path / "adapter_model.safetensors").write_bytes(weights)
        (path / "hyperlora_metadata.json").unlink(missing_ok=True)
        if meta is not None:
            (path / "hyperlora_metadata.json").write_text(meta)
        try:
            adapter = load_peft(path, base_name="HuggingFaceTB/SmolLM2-135M-Instruct", max_bytes=2**20)
        except HyperLoRAError:
            seen["typed"] += 1
            return
        seen["loaded"] += 1
        assert math.isfinite(adapter.scaling)

    run()
    assert seen["examples"] >= EXAMPLES and seen["typed"] > 0, seen


# ---------------------------------------------------------------------- names and references
SIGNER = ReferenceSigner(b"k" * 32, ttl=None)
name_text = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,24}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_.-]{1,24}", fullmatch=True),
    st.text(max_size=12),
    st.text(alphabet="abc.-_\n\r\t/\\ \x00", max_size=6),
    st.sampled_from([".", "..", "tenant\n", "..\n", "a" * 128, "a" * 129, "٣", "ａ", ".tmp-x"]),
    st.integers(),
    st.none(),
    st.binary(max_size=4),
)


def test_random_names_are_checked_exactly_and_references_round_trip():
    seen = {"examples": 0, "accepted": 0}

    @SETTINGS
    @given(namespace=name_text, adapter_id=name_text, noise=st.text(max_size=20), depth=st.integers(0, 4))
    def run(namespace, adapter_id, noise, depth) -> None:
        seen["examples"] += 1
        accepted = []
        for value in (namespace, adapter_id):
            try:
                assert check_name(value, "name") == value
                accepted.append(True)
            except InvalidInputError:
                accepted.append(False)
            ok = (
                isinstance(value, str)
                and 1 <= len(value) <= 128
                and value not in (".", "..")
                and all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)
            )
            assert accepted[-1] == ok, value
        if not all(accepted):
            return
        seen["accepted"] += 1
        ref = SIGNER.issue(namespace, adapter_id)
        clean, valid, rejected = SIGNER.extract(f"{noise}{ref}{noise}")
        assert [(r.namespace, r.adapter_id) for r in valid] == [(namespace, adapter_id)]
        assert not LOOSE_RE.search(clean) and not REF_RE.search(clean)
        for _ in range(depth):  # nested markers never leave a reference behind
            cut = len(ref) // 2
            ref = ref[:cut] + f"[hyperlora-ref {noise}]" + ref[cut:]
        stripped, _ = strip_references(f"{noise}{ref}")
        assert not LOOSE_RE.search(stripped)

    run()
    assert seen["examples"] >= EXAMPLES and seen["accepted"] > 100, seen


@pytest.mark.parametrize("text", ["[hyper[hyperlora-ref]lora-ref x]", "[hyperlora-ref [hyperlora-ref a] b]"])
def test_strip_references_examples(text):
    assert not LOOSE_RE.search(strip_references(text)[0])
