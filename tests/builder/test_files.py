"""moebuild.files.unreadable: the one account of why a named path is no file to read, shared by
data records, trace inputs and spec bases (a base says `base file 'x.yaml' <why>`)."""

import os

import pytest

from moebuild.files import read_text, unreadable


@pytest.mark.parametrize("name, why", [
    ("missing", "does not exist"),
    ("dangling", "is a broken symlink"),
    ("dir", "is a directory, not a file"),
    ("fifo", "is not a regular file but a pipe"),
    ("zero", "is not a regular file but a device"),
    ("file", None),
])
def test_unreadable_says_what_the_path_is(tmp_path, name, why):
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    os.mkdir(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo")  # never opened: opening a pipe blocks until a writer comes
    os.symlink("/dev/zero", tmp_path / "zero")
    (tmp_path / "file").write_text("text")
    assert unreadable(tmp_path / name) == why


def test_read_text_names_the_path_then_why(tmp_path):
    os.mkdir(tmp_path / "dir")
    with pytest.raises(ValueError) as error:
        read_text(tmp_path / "dir", ValueError)
    assert str(error.value) == f"{tmp_path / 'dir'}: is a directory, not a file"
