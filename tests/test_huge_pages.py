"""shards/huge_pages.py: the kernel's huge page mode and a process's huge pages as /sys and /proc say them,
and the variable torch's CPU allocator reads (a shard started with it: tests/test_launch_lifecycle.py)."""

import pytest

from mixserve.shards import huge_pages


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("always madvise never\n", "unknown"),
    ],
)
def test_system_mode_is_the_bracketed_word(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert huge_pages.system_mode(path) == mode


def test_system_mode_without_the_file_is_unknown(tmp_path):
    assert huge_pages.system_mode(tmp_path / "missing") == "unknown"


def test_huge_page_bytes_reads_anon_huge_pages(tmp_path):
    path = tmp_path / "smaps_rollup"
    path.write_text("Rss:             3364300 kB\nAnonymous:       1747884 kB\nAnonHugePages:   1538048 kB\n")
    assert huge_pages.huge_page_bytes(path) == 1538048 * 1024
    path.write_text("Rss:             3364300 kB\n")
    assert huge_pages.huge_page_bytes(path) is None
    assert huge_pages.huge_page_bytes(tmp_path / "missing") is None


def test_requested_reads_the_variable_as_torch_does(monkeypatch):
    monkeypatch.delenv(huge_pages.TORCH_VARIABLE, raising=False)
    assert not huge_pages.requested()
    monkeypatch.setenv(huge_pages.TORCH_VARIABLE, "1")
    assert huge_pages.requested()
    monkeypatch.setenv(huge_pages.TORCH_VARIABLE, "0")
    assert not huge_pages.requested()
    monkeypatch.setenv(huge_pages.TORCH_VARIABLE, "yes")  # torch reads an integer: this is off
    assert not huge_pages.requested()
