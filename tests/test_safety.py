"""The one safetensors check: never refuses a valid file, whatever its first bytes; refuses pickles by signature."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open
from turbobooth.manager.errors import ModelSourceError, UnsafeFileError
from turbobooth.manager.formats import check_safetensors, looks_like_pickle


def _safetensors_with_header_length(path, header_len: int, tensors: dict[str, torch.Tensor]) -> None:
    """A valid safetensors file whose 8-byte header length is exactly ``header_len`` (padded with spaces)."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        data = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= header_len
    raw += b" " * (header_len - len(raw))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_len) + raw + b"".join(blobs))


@pytest.mark.parametrize("header_len", [0x80 + 256 * k for k in (1, 2, 3, 4, 5)] + [0x280 + 65536])
def test_valid_file_whose_first_byte_is_0x80_is_accepted(tmp_path, header_len):
    path = tmp_path / "w.safetensors"
    _safetensors_with_header_length(path, header_len, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    head = path.read_bytes()[:2]
    assert head[0] == 0x80 and header_len % 256 == 128  # the bytes the old guard took for a pickle
    assert check_safetensors(str(path)) == {}
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("w"), torch.arange(6, dtype=torch.float32).reshape(2, 3))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_every_protocol_are_recognised(tmp_path, protocol):
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}, protocol=protocol))
    assert looks_like_pickle(str(path))
    with pytest.raises(UnsafeFileError, match="pickle"):
        check_safetensors(str(path))


def test_torch_save_zip_and_legacy_are_refused(tmp_path):
    for name, kwargs in (("zip.safetensors", {}), ("legacy.safetensors", {"_use_new_zipfile_serialization": False})):
        path = tmp_path / name
        torch.save({"w": torch.zeros(2)}, path, **kwargs)
        with pytest.raises(UnsafeFileError, match="only .safetensors"):
            check_safetensors(str(path))


def test_corrupt_files_are_not_called_pickles(tmp_path):
    path = tmp_path / "w.safetensors"
    _safetensors_with_header_length(path, 0x280, {"w": torch.ones(4)})
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-3])  # starts with 0x80 0x02 like a pickle, but is a truncated safetensors file
    with pytest.raises(ModelSourceError, match="corrupt or truncated") as err:
        check_safetensors(str(cut))
    assert not isinstance(err.value, UnsafeFileError)
    assert str(cut) in str(err.value)
    for bad in (b"", b"\x00" * 3, struct.pack("<Q", 1 << 40) + b"{}"):
        path.write_bytes(bad)
        with pytest.raises(ModelSourceError, match="corrupt or truncated"):
            check_safetensors(str(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        check_safetensors(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelSourceError, match="is a folder"):
        check_safetensors(str(tmp_path))
