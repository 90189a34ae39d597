import os
import stat
import threading

import pytest

from headkv_engine import files


def names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_text_atomic(tmp_path):
    path = tmp_path / "report.md"
    files.write_text_atomic(path, "first\n")
    files.write_text_atomic(str(path), "second\n")
    assert path.read_text() == "second\n"
    assert names(tmp_path) == ["report.md"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # as open() would make it, not mkstemp's 0600


def test_failed_text_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old\n")

    real_open = open

    def failing_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        real_write = f.write

        def write(text):
            real_write(text[:3])  # half the text reaches the temporary, then the disk "fills"
            raise OSError(28, "No space left on device")

        f.write = write
        return f

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        files.write_text_atomic(path, "new text\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert names(tmp_path) == ["report.md"]


def test_write_csv_atomic_round_trip_and_generator(tmp_path):
    path = tmp_path / "rows.csv"
    files.write_csv_atomic(path, ({"a": i, "b": 2 * i} if i % 2 else {"a": i, "c": "x"} for i in range(4)))
    assert files.read_csv(path) == [
        {"a": "0", "b": "", "c": "x"}, {"a": "1", "b": "2", "c": ""},
        {"a": "2", "b": "", "c": "x"}, {"a": "3", "b": "6", "c": ""},
    ]
    assert names(tmp_path) == ["rows.csv"]


def test_failed_csv_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "rows.csv"
    files.write_csv_atomic(path, [{"a": 1}])
    before = path.read_bytes()

    def rows_failing_midway():
        yield {"a": 2}
        raise RuntimeError("the benchmark crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        files.write_csv_atomic(path, rows_failing_midway())

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format")

    # fails inside the writer, after the header and a first row reached the temporary
    with pytest.raises(RuntimeError, match="cannot format"):
        files.write_csv_atomic(path, [{"a": 2}, {"a": Unprintable()}])
    assert path.read_bytes() == before
    assert names(tmp_path) == ["rows.csv"]


def test_writes_to_different_paths_in_one_directory_do_not_collide(tmp_path):
    """Each write has its own temporary: two writes open at once, and two threads writing, all land intact."""
    start = threading.Event()
    done = []

    with files.atomic_path(tmp_path / "a.csv", ".csv") as tmp_a, files.atomic_path(tmp_path / "b.csv", ".csv") as tmp_b:
        assert tmp_a != tmp_b
        assert os.path.dirname(tmp_a) == os.path.dirname(tmp_b) == str(tmp_path)
        assert tmp_a.endswith(".csv") and os.path.basename(tmp_a).startswith(".a.csv.")
        with open(tmp_a, "w") as f:
            f.write("a\n")
        with open(tmp_b, "w") as f:
            f.write("b\n")
    assert (tmp_path / "a.csv").read_text() == "a\n"
    assert (tmp_path / "b.csv").read_text() == "b\n"

    def write(name):
        start.wait(5)
        for _ in range(20):
            files.write_csv_atomic(tmp_path / name, [{"tag": name, "i": i} for i in range(3)])
            files.write_text_atomic(tmp_path / f"{name}.txt", name * 1000)
        done.append(name)

    threads = [threading.Thread(target=write, args=(n,)) for n in ("x", "y")]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    assert sorted(done) == ["x", "y"]
    assert files.read_csv(tmp_path / "x") == [{"tag": "x", "i": str(i)} for i in range(3)]
    assert files.read_csv(tmp_path / "y") == [{"tag": "y", "i": str(i)} for i in range(3)]
    assert (tmp_path / "x.txt").read_text() == "x" * 1000
    assert names(tmp_path) == ["a.csv", "b.csv", "x", "x.txt", "y", "y.txt"]


def test_atomic_path_removes_temp_on_error(tmp_path):
    with pytest.raises(KeyboardInterrupt), files.atomic_path(tmp_path / "out.bin") as tmp:
        assert os.path.exists(tmp)
        raise KeyboardInterrupt
    assert names(tmp_path) == []


@pytest.mark.parametrize("name, magic", [("plot.png", b"\x89PNG"), ("plot.svg", b"<?xml"), ("plot.pdf", b"%PDF"),
                                         ("plot", b"\x89PNG")])
def test_save_figure_format_follows_extension(tmp_path, name, magic):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    files.save_figure(fig, tmp_path / name)
    assert (tmp_path / name).read_bytes().startswith(magic)
    assert names(tmp_path) == [name]
    assert not plt.fignum_exists(fig.number)


def test_failed_save_figure_keeps_old_file_and_closes_figure(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    fig, _ = plt.subplots()

    def failing_savefig(target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("renderer failed")

    monkeypatch.setattr(fig, "savefig", failing_savefig)
    with pytest.raises(RuntimeError, match="renderer failed"):
        files.save_figure(fig, path)
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["plot.png"]
    assert not plt.fignum_exists(fig.number)
