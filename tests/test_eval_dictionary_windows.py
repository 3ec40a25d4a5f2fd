"""Dictionary lookup evaluation: definitions reach memory in windows of whole records."""

import pytest

from fotlab.data.synthetic import KEY_MARK
from fotlab.eval.dictionary import record_windows


def test_record_windows_hold_whole_records_and_every_token():
    record_len, T = 6, 64
    defs = [KEY_MARK, 3, 4, 1, 5, 6] * 50  # 50 records
    windows = record_windows(defs, record_len, T, bos=[256])
    assert windows[0][0] == 256 and len(windows[0]) == 1 + (T - 1) // record_len * record_len
    assert all(len(w) <= T for w in windows)
    assert sum(windows, [])[1:] == defs  # nothing lost or reordered
    for w in windows[1:]:
        assert len(w) % record_len == 0 and w[0] == KEY_MARK
    assert windows[0][1] == KEY_MARK


def test_record_windows_without_bos_and_too_small_window():
    windows = record_windows([0, 7, 1, 8] * 5, 4, 8, bos=[])
    assert windows == [[0, 7, 1, 8] * 2, [0, 7, 1, 8] * 2, [0, 7, 1, 8]]
    with pytest.raises(ValueError):
        record_windows([0, 7, 1, 8], 4, 4, bos=[256])
