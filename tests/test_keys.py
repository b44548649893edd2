from __future__ import annotations

import json
import os
import stat
import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stip import keys
from stip.keys import Attention, ClientKey, Free, InvalidKey, Key

MODEL = {"model_type": "test", "architecture": "Test", "digest": "0" * 64}


def layout(heads=4, kv=2, hd=4, rope=True):
    return {
        keys.PI: Free(heads * hd),
        keys.PI_C: Free(11),
        "layer.0.attn": Attention(heads, kv, hd, rope),
        "layer.0.ffn": Free(37),
    }


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@settings(max_examples=60)
@given(kv=st.integers(1, 4), group=st.integers(1, 4), hd=st.integers(1, 8), rope=st.booleans())
def test_generated_attention_is_head_structured(kv, group, hd, rope):
    spec = Attention(kv * group, kv, hd, rope)
    p = keys._draw_attention(spec)
    for part, n in spec.lengths().items():
        keys.check_permutation(part, p[part], n)
    keys.check_attention("a", spec, p["q"], p["k"], p["v"], p["o"])


def test_random_permutation_is_uniform_enough():
    # 6 permutations of 3 items, 6000 draws: each about 1000 (5 sigma is ±160).
    counts = Counter(tuple(keys.random_permutation(3)) for _ in range(6000))
    assert len(counts) == 6
    assert all(840 < c < 1160 for c in counts.values()), counts


def test_invert():
    p = keys.random_permutation(50)
    x = np.arange(50) * 10
    assert np.array_equal(x[p][keys.invert(p)], x)


def test_two_draws_differ():
    a, b = keys.generate(layout(), MODEL), keys.generate(layout(), MODEL)
    assert a.fingerprint != b.fingerprint
    assert not np.array_equal(a.pi, b.pi)


def test_provider_key_roundtrip_and_mode(tmp_path):
    old = os.umask(0o000)  # even with a permissive umask the file is 0600
    try:
        key = keys.generate(layout(), MODEL)
        path = key.save(tmp_path / "k.stip")
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    loaded = keys.load(path)
    assert isinstance(loaded, Key)
    assert loaded.fingerprint == key.fingerprint
    assert loaded.layout == key.layout and loaded.model == MODEL
    assert all(np.array_equal(loaded[n], key[n]) for n in key.names())


def test_client_key_holds_only_pi_and_pi_c(tmp_path):
    key = keys.generate(layout(), MODEL)
    path = key.client_key().save(tmp_path / "c.stip")
    assert mode(path) == 0o600
    loaded = keys.load(path)
    assert isinstance(loaded, ClientKey)
    assert loaded.fingerprint == key.fingerprint  # links it to its provider key
    assert np.array_equal(loaded.pi, key.pi) and np.array_equal(loaded.pi_c, key.pi_c)
    from safetensors.numpy import load_file

    assert set(load_file(path)) == {"pi", "pi_c"}


def test_repr_never_shows_permutations():
    key = keys.generate(layout(), MODEL)
    for r in (repr(key), repr(key.client_key()), str(key)):
        assert "array" not in r and "[" not in r and key.fingerprint[:16] in r


# --- refusing bad files -------------------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path):
    return keys.generate(layout(), MODEL).save(tmp_path / "k.stip")


def _rewrite(path, arrays, meta):
    from safetensors.numpy import save_file

    save_file(arrays, path, metadata={"stip": json.dumps(meta)})


def _read(path):
    from safetensors.numpy import load_file

    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["stip"])
    return load_file(path), meta


def test_truncated_file_is_refused(key_file):
    blob = key_file.read_bytes()
    key_file.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InvalidKey, match="corrupted or truncated"):
        keys.load(key_file)


def test_empty_and_garbage_files_are_refused(tmp_path):
    for content in (b"", b"not a key at all", os.urandom(4096)):
        p = tmp_path / "bad.stip"
        p.write_bytes(content)
        with pytest.raises(InvalidKey):
            keys.load(p)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidKey, match="cannot read key file"):
        keys.load(tmp_path / "nope.stip")


def test_flipped_byte_fails_the_integrity_check(key_file):
    arrays, meta = _read(key_file)
    p = arrays["layer.0.ffn"].copy()
    p[[0, 1]] = p[[1, 0]]  # still a permutation, but not the one fingerprinted
    arrays["layer.0.ffn"] = p
    _rewrite(key_file, arrays, meta)
    with pytest.raises(InvalidKey, match="integrity check"):
        keys.load(key_file)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__("pi", np.append(a["pi"], 99)), "expected a permutation of length"),
        (lambda a: a["layer.0.ffn"].__setitem__(0, a["layer.0.ffn"][1]), "repeats a value"),
        (lambda a: a["layer.0.ffn"].__setitem__(0, 1000), "outside"),
        (lambda a: a.pop("layer.0.ffn"), "missing"),
        (lambda a: a.__setitem__("extra", np.arange(3)), "unexpected"),
    ],
)
def test_non_permutations_are_refused(key_file, mutate, message):
    arrays, meta = _read(key_file)
    arrays = {k: v.copy() for k, v in arrays.items()}
    mutate(arrays)
    _rewrite(key_file, arrays, meta)
    with pytest.raises(InvalidKey, match=message):
        keys.load(key_file)


def test_attention_that_is_not_head_structured_is_refused(key_file):
    """A valid permutation of the right length that mixes heads would silently break attention."""
    arrays, meta = _read(key_file)
    arrays = dict(arrays)
    arrays["layer.0.attn.k"] = keys.random_permutation(arrays["layer.0.attn.k"].size)
    _rewrite(key_file, arrays, meta)
    with pytest.raises(InvalidKey, match="head"):
        keys.load(key_file)


def test_rope_within_head_shuffle_is_refused():
    spec = Attention(4, 2, 4, rope=False)
    p = keys._draw_attention(spec)
    while (p["k"][:4] % 4 == np.arange(4)).all():  # make sure some head is shuffled
        p = keys._draw_attention(spec)
    with pytest.raises(InvalidKey, match="RoPE"):
        keys.check_attention("a", Attention(4, 2, 4, rope=True), p["q"], p["k"], p["v"], p["o"])


def test_query_heads_must_follow_their_kv_head():
    spec = Attention(4, 2, 2, rope=True)
    p = keys._draw_attention(spec)
    q = p["q"].reshape(4, 2)
    q = np.concatenate([q[[0, 2]], q[[1, 3]]]).ravel()  # swap query heads across groups
    with pytest.raises(InvalidKey):
        keys.check_attention("a", spec, q, p["k"], p["v"], p["o"])


def test_unknown_format_is_refused(key_file):
    arrays, meta = _read(key_file)
    meta["format"] = "stip-key/99"
    _rewrite(key_file, arrays, meta)
    with pytest.raises(InvalidKey, match="format"):
        keys.load(key_file)


def test_client_key_with_extra_arrays_is_refused(tmp_path):
    key = keys.generate(layout(), MODEL)
    path = key.client_key().save(tmp_path / "c.stip")
    arrays, meta = _read(path)
    arrays = dict(arrays, **{"layer.0.ffn": key["layer.0.ffn"]})
    _rewrite(path, arrays, meta)
    with pytest.raises(InvalidKey, match="holds 'pi' and 'pi_c'"):
        keys.load(path)


def test_token_mode_client_key_holds_pi_c_only(tmp_path):
    key = keys.generate(layout(), MODEL)
    loaded = keys.load(key.client_key(tokens=True).save(tmp_path / "c.stip"))
    assert loaded.tokens_only and loaded.fingerprint == key.fingerprint
    assert np.array_equal(loaded.pi_c, key.pi_c)
    with pytest.raises(InvalidKey, match="π_c only"):
        loaded.pi


def test_layout_checks():
    with pytest.raises(InvalidKey, match="pi"):
        keys.generate({"x": Free(3)}, MODEL)
    with pytest.raises(InvalidKey, match="KV groups"):
        keys.generate({**layout(), "bad": Attention(3, 2, 4, True)}, MODEL)
