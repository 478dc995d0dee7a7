"""GGUF header reading and the shared parse of one load (optimum_prune.gguf_reading)."""

import os

import gguf
import numpy as np
import pytest

from optimum_prune.gguf_reading import GGUFHeaderError, read_gguf_string, shared_gguf_parsing
from tests.gguf_writer import write_gguf_of_architecture


def _field_string(path, key):
    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def test_header_key_equals_the_full_parse(tmp_path):
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("a.scalar", 7)
    w.add_array("a.strings", ["x", "yy", "zzz"])  # arrays of strings and of scalars before the key we read
    w.add_array("a.floats", [0.5, 1.5])
    w.add_bool("a.flag", True)
    w.add_string("b.name", "tiny model")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for key in ("general.architecture", "b.name"):
        assert read_gguf_string(path, key) == _field_string(path, key)
    assert read_gguf_string(path, "b.name") == "tiny model"
    assert read_gguf_string(path, "no.such.key") is None
    assert read_gguf_string(path, "a.scalar") is None  # not a string


def test_header_reader_refuses_what_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFHeaderError, match="no GGUF magic"):
        read_gguf_string(str(tmp_path / "x.gguf"), "general.architecture")
    write_gguf_of_architecture(str(tmp_path / "t.gguf"), "llama", floats=64)
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:40])  # the header cut inside the first key/value pairs
    with pytest.raises(GGUFHeaderError, match="cut short"):
        read_gguf_string(str(tmp_path / "cut.gguf"), "no.such.key")


def test_one_load_parses_the_file_once(tmp_path, monkeypatch):
    path = str(tmp_path / "t.gguf")
    write_gguf_of_architecture(path, "llama", floats=64)
    parses = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *args, **kwargs):
            parses.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with shared_gguf_parsing():
        first = gguf.GGUFReader(path)
        again = gguf.GGUFReader(os.path.join(str(tmp_path), "t.gguf"), "r")
        assert again is first and len(parses) == 1
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is Counting  # restored after the block
    assert gguf.GGUFReader(path) is not first and len(parses) == 2


def test_a_truncated_gguf_is_named_as_such(tmp_path):
    from optimum_prune import ModelLoadError, Pruner

    write_gguf_of_architecture(str(tmp_path / "full.gguf"), "llama", floats=64)
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:100])  # general.architecture survives, the rest of the header does not
    assert read_gguf_string(str(tmp_path / "cut.gguf"), "general.architecture") == "llama"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf could not be parsed .*truncated or corrupt; restore it"):
        Pruner.from_pretrained(str(tmp_path), gguf_file="cut.gguf")
    assert sorted(os.listdir(tmp_path)) == before
