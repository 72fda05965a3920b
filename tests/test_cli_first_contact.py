"""First contact (issue 13): every cheap mistake fails fast with one `error:` line and exit 2,
long commands say what they do, Ctrl-C says how to continue, and the small conveniences work."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fault_helpers import run_cli
from train_helpers import MOVING, build_tiny_world, single_thread, tiny_config, write_jsonl

from tspo.errors import TSPOError

# Runs `tspo ARGS` in a fresh process and reports whether torch was imported by the time it ended.
PROBE = (
    "import sys\n"
    "from tspo.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)\n"
)


def probe(args: list[str], cwd: Path | None = None) -> tuple[int, list[str], float]:
    """Exit status, stderr lines and CPU seconds (user + system) of `tspo ARGS` in a new process.

    CPU time, not wall time: the test machine is shared, and CPU time is what the work costs.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.returncode, done.stderr.splitlines(), cpu


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A QA file, a corpus, a folder that is neither a model nor an index, and a file."""
    root = tmp_path_factory.mktemp("first")
    qa = write_jsonl(
        root / "qa.jsonl",
        [{"id": "q0", "question": "Capital of France?", "golden_answers": ["Paris"]}],
    )
    corpus = write_jsonl(root / "corpus.jsonl", [{"id": "0", "contents": "Paris\nCapital."}])
    plain = root / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a model", encoding="utf-8")
    return {"qa": qa, "corpus": corpus, "plain": plain, "file": plain / "notes.txt", "root": root}


def _train_args(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        "train",
        "model.name=tspo-tiny-base",
        f"data.train_files=[{files['qa']}]",
        f"retriever.corpus={files['corpus']}",
        f"train.output_dir={files['root'] / 'run'}",
        *extra,
    ]


def _torch_build_is_cpu_only() -> bool:
    from importlib.metadata import version

    return "+cpu" in version("torch")


TRAIN_MISTAKES = [
    ("missing QA file", ["data.train_files=[nowhere.jsonl]"], "data.train_files"),
    ("unknown model", ["model.name=no-such-model"], "unknown model 'no-such-model'"),
    ("folder, not a model", ["model.name={plain}"], "is not a model folder (no config.json)"),
    ("folder, not an index", ["retriever.corpus=null", "retriever.index={plain}"], "not an index"),
    ("estimator typo", ["algo.estimator=tpso"], "did you mean tspo?"),
    ("output is a file", ["train.output_dir={file}"], "is a file, not a folder"),
    ("no chat template", ["rollout.use_chat_template=true"], "has no chat template"),
    ("config key typo", ["trian.steps=2"], "did you mean train?"),
]


@pytest.mark.parametrize(
    ("what", "extra", "expected"), TRAIN_MISTAKES, ids=[m[0] for m in TRAIN_MISTAKES]
)
def test_train_mistakes_fail_fast_with_one_line(
    files: dict[str, Path], what: str, extra: list[str], expected: str
) -> None:
    extra = [item.format(plain=files["plain"], file=files["file"]) for item in extra]
    code, lines, cpu = probe(_train_args(files, *extra))
    assert code == 2, lines
    assert lines[0].startswith("error: ") and expected in lines[0], lines
    assert lines[1:] == ["torch not loaded"], lines  # nothing else printed; no model loaded
    assert cpu < 2.0, f"{what}: {cpu:.2f} s of CPU"


@pytest.mark.skipif(not _torch_build_is_cpu_only(), reason="needs a CPU-only torch build")
def test_cuda_on_a_cpu_build_fails_fast(files: dict[str, Path]) -> None:
    code, lines, _ = probe(_train_args(files, "model.device=cuda"))
    assert code == 2 and "CPU-only" in lines[0] and lines[1:] == ["torch not loaded"], lines


def test_train_refuses_an_existing_run_before_loading(
    files: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    code, lines, _ = probe(_train_args(files, f"train.output_dir={run}"))
    assert code == 2 and "already holds a run" in lines[0], lines
    assert lines[1:] == ["torch not loaded"], lines


def test_a_flag_that_is_a_config_field_points_to_it() -> None:
    code, lines, cpu = probe(["train", "--steps", "1"])
    assert code == 2
    assert lines[0] == (
        "error: tspo train: no option --steps; config fields are set as section.field=value: "
        "did you mean train.steps=1?"
    )
    assert cpu < 2.0


def test_a_mistyped_flag_gets_the_closest_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_cli(["eval", "--dat", "x.jsonl"], capsys)
    assert code == 2 and lines == ["error: tspo eval: no option --dat; did you mean --data?"]
    code, lines = run_cli(["trian"], capsys)
    assert code == 2 and lines == ["error: tspo: no command 'trian'; did you mean train?"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--model", "no-such-model"], "--model: unknown model 'no-such-model'"),
        (["--model", "tspo-tiny-base", "--data", "nowhere.jsonl"], "--data: nowhere.jsonl"),
        (["--model", "{plain}"], "is not a model folder (no config.json)"),
        (["--model", "tspo-tiny-base", "--index", "{plain}"], "is not an index folder"),
    ],
)
def test_eval_mistakes_fail_fast(files: dict[str, Path], extra: list[str], expected: str) -> None:
    args = ["eval", "--data", str(files["qa"]), "--corpus", str(files["corpus"])]
    if "--index" in extra:
        args = ["eval", "--data", str(files["qa"])]
    if "--data" in extra:
        args = ["eval", "--corpus", str(files["corpus"])]
    code, lines, cpu = probe(args + [item.format(plain=files["plain"]) for item in extra])
    assert code == 2 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert lines[1:] == ["torch not loaded"], lines
    assert cpu < 2.0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["quickstart", "--estimator", "tpso"], "--estimator: unknown estimator 'tpso'"),
        (["quickstart", "--size", "huge"], "--size 'huge'"),
        (["quickstart", "--base", "no-such-model"], "--base: unknown model"),
        (["compare", "--estimators", "grpo,tspoo"], "--estimators: unknown estimator 'tspoo'"),
    ],
)
def test_quickstart_mistakes_fail_before_any_stage(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    out = tmp_path / "qs"
    code, lines, cpu = probe([*args, "--out", str(out)])
    assert code == 2 and expected in lines[0], lines
    assert lines[1:] == ["torch not loaded"], lines
    assert not out.exists()  # no world, no index, no SFT
    assert cpu < 2.0


def test_serve_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    from retrieval_helpers import write_test_corpus

    from tspo.retrieval.index import build_index

    index = tmp_path / "idx"
    build_index(write_test_corpus(tmp_path / "corpus.jsonl"), "bm25", index, show_progress=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines, _ = probe(["serve", "--index", str(index), "--port", str(port)])
    assert code == 2
    assert lines[:-1] == [
        f"error: port {port} on 127.0.0.1 is already in use (another `tspo serve`?); "
        "choose another with --port"
    ]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from tspo import __version__
    from tspo.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"tspo {__version__}"


def test_seed_flag_is_train_seed(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tspo.train.loop as loop

    seen = []

    def fake_train(config: object) -> object:
        seen.append(config)
        return loop.TrainResult(Path(files["root"]), 0, None)

    monkeypatch.setattr(loop, "train", fake_train)
    from tspo.cli import main

    with pytest.raises(SystemExit) as stop:
        main([*_train_args(files), "--seed", "13"])
    assert stop.value.code == 0
    assert seen[0].train.seed == 13
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("tspo train: config (defaults), seed 13, estimator tspo")


def test_interrupt_names_the_step_checkpoint_and_command(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tspo.train.loop as loop

    checkpoint = files["root"] / "run" / "checkpoints" / "step-00000005"

    def interrupted(config: object) -> object:
        raise loop.TrainInterrupted(files["root"] / "run", 7, 20, checkpoint)

    monkeypatch.setattr(loop, "train", interrupted)
    code, lines = run_cli([*_train_args(files), "train.steps=20"], capsys)
    assert code == 130
    assert lines[-2] == (
        f"interrupted: last completed step 7 of 20; last checkpoint {checkpoint} "
        "(steps 6-7 will run again)"
    )
    command = lines[-1].removeprefix("continue with: ")
    assert command.startswith("tspo train --resume auto model.name=tspo-tiny-base")
    assert command.endswith("train.steps=20")


def test_config_field_near_misses() -> None:
    from tspo.train.config import load_config, suggest_field

    assert suggest_field("steps") == "train.steps"
    assert suggest_field("algo.steps") == "train.steps"
    assert suggest_field("algo.estimatr") == "algo.estimator"
    assert suggest_field("optim.learning_rate") is None or "lr" in suggest_field(
        "optim.learning_rate"
    )
    with pytest.raises(TSPOError, match=r"'steps': unknown field; did you mean train.steps\?"):
        load_config(None, ["steps=3"])


def test_relative_paths_in_a_config_file_follow_the_file(tmp_path: Path) -> None:
    from tspo.train.config import load_config

    folder = tmp_path / "configs"
    folder.mkdir()
    (tmp_path / "model").mkdir()
    path = folder / "run.yaml"
    path.write_text(
        "model: {name: ../model, tokenizer: Qwen/Qwen2.5-3B-Instruct}\n"
        "data: {train_files: [../data/qa.jsonl, /abs/qa.jsonl]}\n"
        "retriever: {index: ../data/bm25}\n"
        "eval: {files: [dev.jsonl]}\n"
        "train: {output_dir: ../runs/x, resume: auto}\n",
        encoding="utf-8",
    )
    config = load_config(path, ["checkpoint.every=2"])
    assert config.model.name == str(tmp_path / "model")
    assert config.model.tokenizer == "Qwen/Qwen2.5-3B-Instruct"  # a hub id stays as written
    assert config.data.train_files == [str(tmp_path / "data" / "qa.jsonl"), "/abs/qa.jsonl"]
    assert config.retriever.index == str(tmp_path / "data" / "bm25")
    assert config.eval.files == [str(folder / "dev.jsonl")]
    assert (config.train.output_dir, config.train.resume) == (str(tmp_path / "runs/x"), "auto")
    # overrides on the command line are read against the working folder, as typed
    assert load_config(path, ["train.output_dir=out"]).train.output_dir == "out"


def test_data_wiki_refuses_a_folder_that_holds_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "test.jsonl").write_text("{}\n", encoding="utf-8")
    code, lines = run_cli(["data", "wiki", "--out", str(tmp_path), "--seed", "1"], capsys)
    assert code == 2
    assert lines == [
        f"error: {tmp_path} already exists and is not empty; pass --overwrite to replace it"
    ]
    assert (tmp_path / "test.jsonl").read_text(encoding="utf-8") == "{}\n"


def test_no_signal_warning_after_k_silent_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from tspo.train.loop import NoSignalWatch

    watch = NoSignalWatch(after=3)
    silent = {"zero_signal_groups": 1.0, "reward_mean": 0.0}
    watch.after_step(1, silent)
    watch.after_step(2, {"zero_signal_groups": 0.5, "reward_mean": 0.2})  # a step with signal
    for step in (3, 4):
        watch.after_step(step, silent)
    assert capsys.readouterr().err == ""
    watch.after_step(5, silent)
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning: steps 3-5: every group had zero learning signal")
    assert "warm start" in warning
    watch.after_step(6, silent)
    assert capsys.readouterr().err == ""  # once per streak
    NoSignalWatch(after=0).after_step(1, silent)  # 0 turns it off
    assert capsys.readouterr().err == ""


def test_run_header_resume_diff_interrupt_and_null_cuda_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tspo.train.loop as loop

    world = build_tiny_world(tmp_path / "world")
    out = tmp_path / "run"
    real_step = loop.run_step

    def stop_at_step_3(run: object, step: int) -> object:
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run, step)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "run_step", stop_at_step_3)
    with single_thread():
        config = tiny_config(world, out, *MOVING, "train.steps=4", "checkpoint.every=1")
        with pytest.raises(loop.TrainInterrupted) as stop:
            loop.train(config)
        header = capsys.readouterr().err
        assert (stop.value.step, stop.value.last_checkpoint) == (
            2,
            out / "checkpoints" / "step-00000002",
        )
        assert f"tspo train: model {world.model_dir}: " in header
        assert " parameters on cpu, float32" in header
        assert f"tspo train: 6 questions from {world.qa}" in header
        assert f"tspo train: writing to {out} " in header and "checkpoints: " in header

        monkeypatch.setattr(loop, "run_step", real_step)
        resumed = tiny_config(
            world, out, *MOVING, "train.steps=3", "train.resume=auto", "optim.lr=0.002"
        )
        loop.train(resumed)
    err = capsys.readouterr().err
    assert (
        f"tspo train: resuming from step 2 (checkpoint {out / 'checkpoints' / 'step-00000002'})"
        in err
    )
    warning = next(line for line in err.splitlines() if line.startswith("warning: the config"))
    assert "optim.lr (0.001 -> 0.002)" in warning and "train.steps" not in warning
    last = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert last["step"] == 3 and "peak_cuda_mb" in last and last["peak_cuda_mb"] is None


def test_wandb_offline_logs_metrics_and_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from tspo.train.run_log import WANDB_ID_FILE, RunLog

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLog(tmp_path, wandb={"project": "tspo-test", "name": None, "config": {"a": 1}})
    log.log_step({"step": 1, "reward_mean": 0.5, "loss": float("nan")}, [])
    log.log_validation({"step": 1, "em": 0.25, "f1": 0.5, "answered": 1.0, "invalid_rate": 0.0})
    log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text(encoding="utf-8")
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text(encoding="utf-8"))["step"] == 1
