"""`jaxsafe.files.read_json`: the errors name the file, and where a malformed one goes wrong."""

import pytest

from jaxsafe.files import read_json


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError, match=r"'.*nope.json' \(the run's config\) not found"):
        read_json(tmp_path / "nope.json", "the run's config")
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(
        ValueError,
        match=r"bad.json: invalid JSON at line 2 column 7: "
        "Expecting value",
    ):
        read_json(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"bin.json \(settings\): not a UTF-8 text file"):
        read_json(tmp_path / "bin.json", "settings")
