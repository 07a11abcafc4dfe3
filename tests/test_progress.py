"""Progress: periodic lines in a batch log, a throttled bar on a terminal, per-rank log files."""

from __future__ import annotations

import io
import logging
import re

from hpcrender.run.progress import Progress, rank_log_name, setup_rank_logging


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_batch_log_gets_one_line_per_interval_with_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, tty=False, interval_s=5.0, clock=clock)
    progress.start("harbor", 20)
    for _ in range(12):  # one step every 0.4333 s: 12 steps at 5.2 s
        clock.t += 5.2 / 12
        progress.update()
    lines = out.getvalue().splitlines()
    assert lines == ["harbor: step 12/20, 2.31 step/s, ETA 0:00:03"]
    for _ in range(8):
        clock.t += 0.5
        progress.update()
    assert len(out.getvalue().splitlines()) == 1  # 4 s since the last line: not yet
    progress.finish()
    last = out.getvalue().splitlines()[-1]
    assert last == "harbor: done (20/20 step in 0:00:09, 2.17 step/s)"
    assert "\r" not in out.getvalue()


def test_a_job_with_nothing_left_to_render_says_so_rather_than_a_rate():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, tty=False, interval_s=5.0, clock=clock)
    progress.start("coast", 0, unit="tile")
    clock.t += 75
    progress.finish("coast: done in 75.0s, seam score 1.02")
    assert out.getvalue() == "coast: done in 75.0s, seam score 1.02 (no tile left to render, 0:01:15)\n"


def test_batch_lines_keep_coming_every_interval():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, tty=False, interval_s=2.0, clock=clock)
    progress.start("giga", 80, unit="tile")
    for _ in range(80):
        clock.t += 0.125
        progress.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # 10 s of work, a line every 2 s
    assert lines[0] == "giga: tile 16/80, 8.00 tile/s, ETA 0:00:08"
    assert lines[-1] == "giga: tile 80/80, 8.00 tile/s, ETA 0:00:00"


def test_terminal_bar_redraws_with_carriage_returns_at_most_ten_times_a_second():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, tty=True, clock=clock)
    progress.start("harbor", 50)
    for _ in range(49):
        clock.t += 0.01  # 100 updates a second
        progress.update()
    draws = out.getvalue().count("\r")
    assert 1 + 4 <= draws <= 1 + 5  # the start, then ~0.49 s at 10 Hz
    clock.t += 0.01
    progress.update()  # the last step always draws
    assert out.getvalue().count("\r") == draws + 1
    assert re.search(r"\rharbor \[#{30}\] 50/50 step [\d.]+ step/s ETA 0:00:00", out.getvalue())
    progress.finish("harbor: done, image.png written")
    assert out.getvalue().endswith("\nharbor: done, image.png written (50/50 step in 0:00:01, 100.00 step/s)\n")


def test_a_new_job_ends_the_previous_bar_line():
    out, clock = io.StringIO(), FakeClock()
    progress = Progress(out, tty=True, clock=clock)
    progress.start("a", 2)
    progress.start("b", 2)
    assert "\n\rb [" in out.getvalue()


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    progress = Progress(out, enabled=False, tty=True)
    progress.start("harbor", 3)
    progress.update(3)
    progress.finish()
    assert out.getvalue() == ""


def test_tty_follows_the_stream_when_not_given():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Progress(Terminal()).tty and not Progress(io.StringIO()).tty


def test_rank_logs_of_job_array_tasks_never_share_a_file():
    names = {rank_log_name(rank, task) for rank in range(3) for task in (None, 0, 1, 12)}
    assert len(names) == 12
    assert rank_log_name(3) == "rank-0003.log"
    assert rank_log_name(0, 3) == "rank-0000.task-3.log"


def test_rank_log_of_an_array_task_is_its_own_file(tmp_path):
    logger = setup_rank_logging(tmp_path, 0, "node07", array_task=3)
    logging.getLogger("hpcrender").info("task three")
    for handler in list(logger.handlers):
        handler.flush()
        logger.removeHandler(handler)
        handler.close()
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["rank-0000.task-3.log"]


def test_rank_log_is_one_file_per_rank_with_stamped_lines(tmp_path):
    logger = setup_rank_logging(tmp_path, 3, "node07")
    logging.getLogger("hpcrender.store").info("resuming %d tiles", 5)
    logging.getLogger("hpcrender.store").debug("hidden without --debug")
    logger = setup_rank_logging(tmp_path, 3, "node07", debug=True)  # again: replaces, no duplicates
    logging.getLogger("hpcrender.render").debug("step 1")
    for handler in logger.handlers:
        handler.flush()
    lines = (tmp_path / "logs" / "rank-0003.log").read_text().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z rank 3 node07 INFO hpcrender\.store: resuming 5 tiles", lines[0]
    )
    assert lines[1].endswith("DEBUG hpcrender.render: step 1")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
