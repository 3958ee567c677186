"""Visit metadata from participants.tsv / sessions.tsv."""

import pytest

from alsiron.errors import InputError
from alsiron.io.tables import visit_info


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_visit_info_reads_both_tables(tmp_path):
    _write(tmp_path / "participants.tsv",
           "participant_id\tage\tsex\tgroup\tsite\nsub-01\t60.5\tF\tALS\tsite-02\n"
           "sub-02\tn/a\tM\tcontrol\tsite-01\n")
    _write(tmp_path / "sub-01" / "sub-01_sessions.tsv",
           "session_id\tacq_time\nses-01\t2025-01-06T08:00:00\nses-02\t2026-01-06T08:00:00\n")
    info = visit_info(tmp_path, "01", "02")
    assert info.years_since_baseline == pytest.approx(365 / 365.25)
    assert info.age == pytest.approx(61.5, abs=0.01)
    assert (info.sex, info.group, info.site) == ("F", "ALS", "site-02")
    assert info.acq_time == "2026-01-06T08:00:00"
    other = visit_info(tmp_path, "sub-02", "ses-01")
    assert other.age is None and other.years_since_baseline == 0.0 and other.group == "control"


def test_visit_info_without_tables_is_empty_not_an_error(tmp_path):
    info = visit_info(tmp_path, "sub-05", "ses-03")
    assert info.age is None and info.acq_time is None and info.years_since_baseline is None


def test_bad_acq_time_names_the_file(tmp_path):
    _write(tmp_path / "sub-01" / "sub-01_sessions.tsv", "session_id\tacq_time\nses-01\tyesterday\n")
    with pytest.raises(InputError, match="sub-01_sessions.tsv.*ISO 8601"):
        visit_info(tmp_path, "sub-01", "ses-01")

