"""What a user sees while things run (issue 18, item 5): rich progress with the run's ETA beside the epoch's,
bars for validation, `vitkit validate`, `predict` and `export`, all fitting 80 columns with whole time fields,
today's plain log lines when output is not a terminal; `vitkit serve`'s start-up line and access log. Also
validate's num_classes: a recipe's yields to the checkpoint's head, only the command line's is checked.

The terminal checks run the real commands under a pseudo-terminal (os.openpty) 80 columns wide, and read what
they wrote the way a terminal would show it: every redraw (`\\r`, cursor moves) starts a new line.
"""
from __future__ import annotations

import fcntl
import io
import os
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from rich.cells import cell_len
from rich.console import Console
from starlette.testclient import TestClient

from vitkit.data.preprocess import DataConfig
from vitkit.engine.checkpoint import save_checkpoint
from vitkit.engine.evaluate import evaluate
from vitkit.engine.monitor import Bar, Monitor
from vitkit.errors import WeightsError
from vitkit.models import create_model, get_spec
from vitkit.tools.inference import find_images, load_inference_model
from vitkit.tools.predict import predict_files
from vitkit.tools.serve import create_app, load_backend
from vitkit.tools.validate import run_validate

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "cifar10_sample"
CLASSES = sorted(p.name for p in (SAMPLE / "test").iterdir())
COLUMNS = 80
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]")
BAR_GLYPHS = ("━", "╸", "╺")
TIME = r"(\d+:\d\d(:\d\d)?|-:--(:--)?)"  # a whole h:mm:ss / m:ss, or rich's "not yet known"


@pytest.fixture(autouse=True)
def a_capable_terminal_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process terminal consoles below redraw only when TERM is not `dumb` (as rich itself decides)."""
    monkeypatch.setenv("TERM", "xterm-256color")


# -- helpers -----------------------------------------------------------------------------------------------------

def checkpoint(path: Path, num_classes: int = 10, **config: object) -> Path:
    torch.manual_seed(0)
    spec = get_spec("vit_n_4_32")
    return save_checkpoint(path, create_model("vit_n_4_32", depth=2, num_classes=num_classes),
                           model_name="vit_n_4_32", class_names=CLASSES[:num_classes], config=dict(config),
                           data_config=DataConfig(32, spec.mean, spec.std, spec.interpolation, spec.crop_pct))


def small_imagefolder(root: Path, per_class: int) -> Path:
    for c in CLASSES:
        (root / "test" / c).mkdir(parents=True)
        for f in sorted((SAMPLE / "test" / c).iterdir())[:per_class]:
            (root / "test" / c / f.name).symlink_to(f)
    return root


def terminal(width: int = COLUMNS) -> tuple[Console, io.StringIO]:
    """A console that believes it is a `width`-column colour-less terminal, writing into a buffer."""
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=width, color_system=None), buf


def screen_lines(raw: str) -> list[str]:
    """What a terminal shows of `raw`, one entry per drawn line: escapes removed, split at every redraw."""
    return [s for s in re.split(r"[\r\n]", ESCAPES.sub("", raw)) if s.strip()]


def run_in_pty(argv: list[str], *, cwd: Path, timeout: float = 240) -> tuple[int, str]:
    """Run `argv` with stdout and stderr on a pseudo-terminal COLUMNS wide; (exit code, all it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS")}
    env.update(COLUMNS=str(COLUMNS), LINES="24", TERM="xterm-256color", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


# -- the commands on an 80-column terminal -------------------------------------------------------------------------

CHILD = """
import sys
from vitkit.cli import main
for argv in {commands!r}:
    print("=== " + argv[0], flush=True)
    rc = main(argv)
    print("=== rc", rc, flush=True)
"""


@pytest.fixture(scope="module")
def on_a_terminal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """train (the demo recipe, --smoke: 2 epochs of 4 steps, validating), validate, predict over a folder,
    export with a dynamic size (4 steps), all in one child process on an 80-column pseudo-terminal;
    the screen lines of each command."""
    tmp = tmp_path_factory.mktemp("pty")
    run_dir = tmp / "run"
    ckpt = str(run_dir / "last.safetensors")
    data = small_imagefolder(tmp / "data", per_class=4)
    commands = [
        ["train", "--smoke", "--device", "cpu", "--ckpt_save_dir", str(run_dir)],
        ["validate", "--ckpt_path", ckpt, "--data_dir", str(data), "--dataset", "imagefolder", "--val_split", "test",
         "--batch_size", "2", "--num_parallel_workers", "0"],
        ["predict", ckpt, str(data / "test"), "--batch_size", "4", "--format", "csv"],
        ["export", ckpt, "--format", "torchscript", "--dynamic_size", "--out", str(tmp / "m.ts"),
         "--check_images", str(data / "test"), "--check_count", "8"],
    ]
    rc, raw = run_in_pty([sys.executable, "-c", CHILD.format(commands=commands)], cwd=tmp)
    assert rc == 0, raw[-3000:]
    sections: dict[str, list[str]] = {}
    current = None
    for line in screen_lines(raw):
        if line.startswith("=== rc"):
            assert line.strip() == "=== rc 0", (current, raw[-3000:])
        elif line.startswith("=== "):
            current = line[4:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    assert "…" not in raw  # nothing was cut to fit
    return sections


def bar_lines(lines: list[str], label: str) -> list[str]:
    return [x for x in lines if x.startswith(label) and any(g in x for g in BAR_GLYPHS)]


def test_training_bar_shows_epoch_and_run_eta_within_80_columns(on_a_terminal) -> None:
    lines = on_a_terminal["train"]
    bars = bar_lines(lines, "epoch ")
    pattern = re.compile(rf"^epoch [12]/2 [━╸╺ ]+ [0-4]/4 \d:\d\d:\d\d eta {TIME} \| run eta {TIME}$")
    assert bars and all(pattern.match(x) for x in bars), bars
    assert {x.split()[1] for x in bars} == {"1/2", "2/2"}
    assert any(re.search(r"run eta \d+:\d\d$", x) for x in bars)  # a real estimate once steps ran
    stats = [x for x in lines if x.startswith("  loss ")]  # on 80 columns, below the bar
    assert stats and all(re.match(r"^  loss [\d.]+  lr \S+  \d+ img/s  data \d+%$", x) for x in stats)
    # the Monitor's own lines (header, summaries) are wrapped to the terminal; train.py's notes are not its own
    too_wide = [x for x in lines if cell_len(x) > COLUMNS and not x.startswith("note:")]
    assert not too_wide, too_wide
    assert any(x.startswith("epoch 2/2 | train loss") for x in lines)


@pytest.mark.parametrize("command, label, total", [("validate", "validate", "20"), ("predict", "predict", "40"),
                                                   ("export", "export", "4")])
def test_validate_predict_and_export_bars_fit_80_columns(on_a_terminal, command: str, label: str,
                                                         total: str) -> None:
    bars = bar_lines(on_a_terminal[command], label)
    assert bars, on_a_terminal[command]
    assert all(cell_len(x) <= COLUMNS for x in bars), [x for x in bars if cell_len(x) > COLUMNS]
    assert all(re.search(rf" \d+/{total} .*\d:\d\d:\d\d( eta {TIME})?$", x) for x in bars), bars
    assert any(f" {total}/{total} " in x for x in bars)  # it ran to the end
    if command == "export":
        steps = {re.sub(r".* \d/4 (.*) \d:\d\d:\d\d$", r"\1", x) for x in bars}
        assert {"exporting to torchscript", "reloading the export", "checking at 32x32", "checking at 48x48"} <= steps


# -- the training Monitor ----------------------------------------------------------------------------------------

STATS = {"loss": 2.302585, "lr": 1.6e-3, "images_per_s": 12345.0, "data_wait": 0.05}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_run_eta_is_the_runs_pace_times_the_steps_left(tmp_path: Path) -> None:
    console, _ = terminal()
    clock = Clock()
    m = Monitor(tmp_path, console=console, clock=clock)
    m.start_epoch(0, 3, 10, 0)  # 3 epochs of 10 steps
    clock.now += 5
    m.update(5, STATS, eta_s=5.0)
    assert m.run_eta_s == pytest.approx(25.0)  # 1 s/step, 25 steps left
    m.end_epoch()
    clock.now += 7  # 5 more steps, then 2 s of validation between the epochs
    m.start_epoch(1, 3, 10, 0)
    clock.now += 5
    m.update(5, STATS, eta_s=5.0)
    assert m.run_eta_s == pytest.approx(17 / 15 * 15)  # the pace includes the validation time
    m.end_epoch()
    # a resumed run counts from its own first step; max_steps (last_step) ends the run early
    clock.now += 100
    resumed = Monitor(tmp_path / "r", console=terminal()[0], clock=clock)
    resumed.start_epoch(1, 3, 10, 4, last_step=20)
    clock.now += 2
    resumed.update(6, STATS, eta_s=8.0)
    assert resumed.run_eta_s == pytest.approx(2 / 2 * 4)
    resumed.close()
    m.close()


@pytest.mark.parametrize("width", [80, 100, 200])
def test_training_bar_layout_fits_and_keeps_numbers_whole(tmp_path: Path, width: int) -> None:
    console, buf = terminal(width)
    clock = Clock()
    m = Monitor(tmp_path, console=console, clock=clock)
    m.start_epoch(122, 300, 5005, 0)  # long fields: epoch 123/300, 4567/5005, hours of ETA
    clock.now += 4567 * 3
    m.update(4567, STATS, eta_s=7 * 3600 + 62)
    m.end_epoch()  # draws the final frame
    m.close()
    lines = screen_lines(buf.getvalue())
    assert "…" not in buf.getvalue() and all(cell_len(x) <= width for x in lines)
    last = [x for x in lines if x.startswith("epoch 123/300") and "4567/5005" in x][-1]
    assert re.search(r"eta 7:01:02 \| run eta \d+:\d\d:\d\d$", last), last
    assert ("loss 2.3026" in last) == (width >= 140)  # one line when there is room, else the stats go below
    if width < 140:
        assert "  loss 2.3026  lr 0.0016  12345 img/s  data 5%" in lines


def test_plain_log_lines_when_not_a_terminal(tmp_path: Path) -> None:
    buf = io.StringIO()
    m = Monitor(tmp_path, console=Console(file=buf, width=80), log_interval=2)
    assert not m.interactive
    m.start_epoch(0, 2, 4, 0)
    for done in range(1, 5):
        m.update(done, STATS, eta_s=75.0 - done)
    with m.progress_bar("val", total=3) as bar:  # silent off a terminal
        bar.advance(3)
    m.end_epoch()
    m.print("epoch 1/2 | train loss 2.3026 | " + "x" * 100)
    m.close()
    assert buf.getvalue().splitlines() == [
        "epoch 1/2 step 2/4  loss 2.3026  lr 0.0016  12345 img/s  data 5%  eta 1:13",
        "epoch 1/2 step 4/4  loss 2.3026  lr 0.0016  12345 img/s  data 5%  eta 1:11",
        "epoch 1/2 | train loss 2.3026 | " + "x" * 100,  # a log line is never wrapped
    ]


def test_disabled_monitor_draws_and_writes_nothing(tmp_path: Path) -> None:
    console, buf = terminal()
    m = Monitor(tmp_path / "rank1", enabled=False, console=console)
    m.start_epoch(0, 1, 4, 0)
    m.update(1, STATS, eta_s=3.0)
    m.log_step({"loss": 1.0}, 1)
    with m.progress_bar("val", total=2) as bar:
        bar.advance()
    m.end_epoch()
    m.close()
    assert buf.getvalue() == "" and not (tmp_path / "rank1").exists()


# -- evaluate / predict progress --------------------------------------------------------------------------------

def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(3)]


def test_evaluate_progress_is_drawn_on_a_terminal_and_never_changes_results(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = create_model("vit_n_4_32", depth=1).eval()
    batches = _batches()
    silent = evaluate(model, batches, device="cpu", collect=True)
    console, buf = terminal()
    monitor = Monitor(tmp_path, console=console)
    drawn = evaluate(model, batches, device="cpu", collect=True, progress=monitor.progress_bar("val"))
    auto = evaluate(model, iter(batches), device="cpu", collect=True, progress=True)  # stderr, not a terminal here
    monitor.close()
    for got in (drawn, auto):
        assert got.keys() == silent.keys()
        for key, value in silent.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            elif key != "images_per_s":
                assert got[key] == value, key
    bars = bar_lines(screen_lines(buf.getvalue()), "val")
    assert bars and any(" 3/3 " in x for x in bars) and all(cell_len(x) <= COLUMNS for x in bars)
    assert capsys.readouterr().err == ""


def test_predict_files_advances_once_per_file(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "c.safetensors")
    im = load_inference_model(str(ckpt))
    files = find_images([str(SAMPLE / "test" / "cat")])[:5] + [tmp_path / "broken.jpg"]
    files[-1].write_bytes(b"not an image")
    console, buf = terminal()
    drawn = predict_files(im, files, batch_size=2, progress=Bar("predict", console=console))
    assert drawn == predict_files(im, files, batch_size=2)
    bars = bar_lines(screen_lines(buf.getvalue()), "predict")
    assert any(" 6/6 " in x for x in bars) and all(cell_len(x) <= COLUMNS for x in bars)
    assert "error" in drawn[-1]


# -- serve: a start-up line, one access line per request ------------------------------------------------------

ACCESS = r"\d\d\d\d-\d\d-\d\d \d\d:\d\d:\d\d {client} {method} {path} {status} \d+\.\d ms"


@pytest.fixture(scope="module")
def serve_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("serve") / "c.safetensors")


def test_access_log_has_one_line_per_request(serve_ckpt: Path) -> None:
    lines: list[str] = []
    app = create_app(load_backend(str(serve_ckpt)), access_log=lines.append)
    jpeg = (SAMPLE / "test" / "cat" / "0001.jpg").read_bytes()
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/predict?topk=2", content=jpeg).status_code == 200
        assert client.post("/predict", content=b"not an image").status_code == 415
        assert client.get("/nowhere%0Aforged 200").status_code == 404
    want = [("GET", "/health", 200), ("POST", r"/predict\?topk=2", 200), ("POST", "/predict", 415),
            ("GET", "/nowhere%0Aforged%20200", 404)]
    assert len(lines) == len(want), lines
    for line, (method, path, status) in zip(lines, want):
        assert re.fullmatch(ACCESS.format(client="testclient", method=method, path=path, status=status), line), line


def test_no_access_log_unless_asked(serve_ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    with TestClient(create_app(load_backend(str(serve_ckpt)))) as client:
        assert client.get("/health").status_code == 200
    assert capsys.readouterr() == ("", "")


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line.rstrip("\n")) for line in stream], daemon=True).start()
    return q


@pytest.mark.parametrize("quiet", [False, True])
def test_vitkit_serve_says_where_it_listens_and_logs_requests(serve_ckpt: Path, quiet: bool) -> None:
    argv = [sys.executable, "-m", "vitkit.cli", "serve", str(serve_ckpt), "--port", "0"] + (["--quiet"] * quiet)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        err = _lines(proc.stderr)
        first = err.get(timeout=120)
        m = re.fullmatch(r"serving vit_n_4_32 \(pytorch \S+ on cpu\) at (http://127\.0\.0\.1:\d+) "
                         r"\(POST /predict, GET /health, GET /metadata; Ctrl\+C stops\)", first)
        assert m, first
        assert httpx.get(m.group(1) + "/health?probe=1", timeout=30).status_code == 200
        if quiet:
            with pytest.raises(queue.Empty):
                err.get(timeout=1.5)
        else:
            line = err.get(timeout=30)
            assert re.fullmatch(ACCESS.format(client="127.0.0.1", method="GET", path=r"/health\?probe=1",
                                              status=200), line), line
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stdout.read() == ""


# -- validate: a recipe's num_classes yields to the checkpoint -----------------------------------------------------

def test_a_recipes_num_classes_yields_to_the_checkpoint_only_the_command_line_is_checked(tmp_path: Path) -> None:
    data = small_imagefolder(tmp_path / "data", per_class=2)
    ckpt = checkpoint(tmp_path / "c.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("num_classes: 1000\nmodel: vit_n_4_32\n")  # e.g. the ImageNet recipe a 10-class run came from
    base = ["-c", str(recipe), "--ckpt_path", str(ckpt), "--data_dir", str(data), "--dataset", "imagefolder",
            "--val_split", "test", "--num_parallel_workers", "0"]
    assert run_validate(base)["num_images"] == 20
    assert run_validate(base + ["--num_classes", "10"])["num_images"] == 20  # the command line agrees
    with pytest.raises(WeightsError, match=r"10-class head but the config says num_classes 1000; drop --num_classes"):
        run_validate(base + ["--num_classes", "1000"])
