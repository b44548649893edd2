import pytest
import torch

from stip import wire
from stip.serve.sessions import SessionStore
from stip.wire import FLOATS, INTS, Spec, WireError

SPEC = {"embeddings": Spec(FLOATS, 3), "attention_mask": Spec(INTS, 2, required=False)}


def test_round_trip_keeps_values_and_metadata():
    x = torch.randn(2, 3, 4)
    blob = wire.encode({"embeddings": x}, meta={"session": "abc", "length": 3})
    tensors, meta = wire.decode(blob, SPEC)
    assert torch.equal(tensors["embeddings"], x)
    assert meta == {"session": "abc", "length": "3"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.int8, torch.uint8, torch.bool])  # fmt: skip
def test_every_dtype_reads_back_as_safetensors_writes_it(dtype):
    from safetensors.torch import load, save

    tensors = {"b": (torch.randn(3, 5) * 50).to(dtype), "a": torch.arange(7).to(dtype)[2:], "empty": torch.zeros(0, 4).to(dtype)}
    blob = wire.encode(tensors, meta={"op": "0.qkv"})
    for got in (load(blob), wire.decode(blob)[0]):
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert load(save(tensors)).keys() == load(blob).keys()


def test_float16_is_accepted():
    tensors, _ = wire.decode(wire.encode({"embeddings": torch.randn(1, 2, 4).half()}), SPEC)
    assert tensors["embeddings"].dtype == torch.float16


@pytest.mark.parametrize(
    "blob, status, message",
    [
        (b"", 400, "too short"),
        (b"\xff" * 64, 400, "header length"),
        (b"{\"embeddings\": [[1, 2]]}", 400, "malformed"),
        (wire.encode({"embeddings": torch.randn(1, 2, 4)})[:-5], 400, "malformed"),
        (wire.encode({"embeddings": torch.randn(2, 4)}), 422, "3 dimensions"),
        (wire.encode({"embeddings": torch.ones(1, 2, 4, dtype=torch.int64)}), 422, "dtype int64"),
        (wire.encode({"embeddings": torch.tensor([[[float("nan")]]])}), 422, "NaN"),
        (wire.encode({"embeddings": torch.tensor([[[float("inf")]]])}), 422, "NaN or Inf"),
        (wire.encode({"attention_mask": torch.ones(1, 2, dtype=torch.int64)}), 422, "missing tensor 'embeddings'"),
        (wire.encode({"embeddings": torch.randn(1, 2, 4), "secret": torch.zeros(1)}), 422, "unexpected tensor"),
    ],
)
def test_bad_messages_are_refused(blob, status, message):
    with pytest.raises(WireError, match=message) as e:
        wire.decode(blob, SPEC)
    assert e.value.status == status


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_sessions_expire_cap_and_lock():
    clock = Clock()
    store = SessionStore(max_sessions=2, idle_seconds=10, clock=clock)
    a, b = store.add("cache-a", 3), store.add("cache-b", 3)
    with pytest.raises(WireError) as e:
        store.add("cache-c", 1)
    assert e.value.status == 429
    s = store.acquire(a.id)
    with pytest.raises(WireError) as e:
        store.acquire(a.id)  # one step at a time
    assert e.value.status == 409
    clock.t = 5
    store.release(s)  # a was used at t=5
    clock.t = 11  # b has idled 11 s > 10, a only 6
    store.release(store.acquire(a.id))
    with pytest.raises(WireError) as e:
        store.acquire(b.id)
    assert e.value.status == 410
    with pytest.raises(WireError) as e:
        store.acquire("no-such-session")
    assert e.value.status == 404
    assert len(a.id) >= 24 and a.id != b.id
