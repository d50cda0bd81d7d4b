"""Beat's scheduler: it must start on a fresh machine, where DATA_DIR does not exist yet."""

from __future__ import annotations

from pathlib import Path

from workers import Scheduler, celery


def test_beat_creates_the_folder_of_its_schedule_file(tmp_path: Path) -> None:
    filename = tmp_path / "not" / "there" / "celerybeat-schedule"
    scheduler = Scheduler(app=celery, schedule_filename=str(filename))
    try:
        assert filename.parent.is_dir()
        assert {"sweep", "schedule"} <= set(scheduler.schedule)  # the beat entries of celeryconfig
    finally:
        scheduler.close()
    assert list(filename.parent.iterdir())  # the schedule was written there


def test_celery_beat_uses_that_scheduler() -> None:
    assert celery.conf.beat_scheduler == "workers:Scheduler"
