"""Every command the README and the docs pages show parses: each fenced ``bash`` block's ``python ...`` lines are run
through their own entry point (``main(argv)``) up to the end of argument parsing and stopped there, so nothing
trains, loads or writes; a flag the CLI does not accept (renamed, removed, misspelt) fails here, naming the page and
the command, instead of misleading a user. And every demo input a page reads (a folder under ``data/``, the quickstart's
``runs/demo``) is written by the quickstart or by a command the page shows before it (tests/test_demo_commands.py runs
them)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# programs the docs show that are not ours: their flags are not checked here
NOT_OURS = {"pip", "mkdocs", "hf", "huggingface-cli", "bash", "wandb", "git", "cd", "ls", "export", "srun", "sbatch",
            "mkdir", "cp", "tar", "unzip", "nvidia-smi"}
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate", "generate.py": "generate", "export.py": "export",
           "reproduce.py": "reproduce"}


class Parsed(BaseException):
    """Raised right after a parser accepted the command line: the command stops before doing anything."""


def shown_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every command line in the pages' fenced bash blocks (continuations joined, comments and
    shell chaining split off), ``argv[0]`` the program. ``...`` stands, as in the pages, for the arguments of the
    last full command of that program on the page."""
    out = []
    for page in PAGES:
        last: dict = {}  # program -> the arguments of its last command on this page without "..."
        text = page.read_text()
        for block in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            body = block.group(1).replace("\\\n", " ")
            line_no = text[:block.start()].count("\n") + 2
            for offset, line in enumerate(body.splitlines()):
                for part in re.split(r"\s(?:&&|;|\|\|)\s", line):
                    try:
                        argv = shlex.split(part, comments=True)
                    except ValueError as err:
                        raise AssertionError(f"{page.name}:{line_no + offset}: cannot split {part!r}: {err}") from None
                    argv = argv[:next((i for i, a in enumerate(argv) if a in (">", ">>", "2>", "|", "&")), len(argv))]
                    if not argv:
                        continue
                    program = tuple(argv[:2])
                    # "--flag ...": a value left to the reader; "python x.py ... --more": the last full command's inputs
                    argv = [a if a != "..." or not argv[i - 1].startswith("--") else "VALUE" for i, a in enumerate(argv)]
                    if "..." in argv:
                        at = argv.index("...")
                        assert program in last, f"{page.name}:{line_no + offset}: '...' before any full {argv[1]} command"
                        argv = argv[:at] + last[program] + argv[at + 1:]
                    elif "VALUE" not in argv:
                        last[program] = inputs(argv[2:])
                    out.append((f"{page.relative_to(REPO)}:{line_no + offset}", argv))
    return out


def inputs(args: list[str]) -> list[str]:
    """The ``--flag value`` pairs of a command's arguments (its inputs), without bare switches such as ``--dry-run``."""
    return [x for i in range(len(args) - 1) if args[i].startswith("--") and not args[i + 1].startswith("-")
            for x in args[i:i + 2]]


def entry_point(argv: list[str]):
    """``(main, args)`` of a ``python ...`` command line, or None for a program that is not ours."""
    if argv[0] in NOT_OURS or argv[:3] == ["python", "-m", "pytest"]:
        return None
    assert argv[0] == "python" and len(argv) > 1, f"not a program the docs test knows: {argv[0]!r} (add it to NOT_OURS?)"
    if argv[1] == "-m":
        return importlib.import_module(argv[2]).main, argv[3:]
    if argv[1] in SCRIPTS:
        module = importlib.import_module(SCRIPTS[argv[1]])
        return (module.train if argv[1] == "train.py" else module.main), argv[2:]
    path = REPO / argv[1]
    assert path.is_file() and path.suffix == ".py", f"{argv[1]}: no such script in the repository"
    spec = importlib.util.spec_from_file_location(f"docs_command_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, argv[2:]


def stop_after_parsing(monkeypatch) -> None:
    """Every parser (argparse's, and jsonargparse's under LightningCLI) raises :class:`Parsed` once it has accepted
    its arguments."""
    import jsonargparse

    for cls in (argparse.ArgumentParser, jsonargparse.ArgumentParser):
        original = cls.parse_args

        def parse_args(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            raise Parsed()

        monkeypatch.setattr(cls, "parse_args", parse_args)


def parse(argv: list[str], monkeypatch) -> str:
    """'' when the command's CLI accepts ``argv``, else what it said."""
    found = entry_point(argv)
    if found is None:
        return ""
    main, args = found
    stop_after_parsing(monkeypatch)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            main(list(args))
    except Parsed:
        return ""
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help, --print_config: accepted, and printed what they print
            return ""
        return said.getvalue().strip().splitlines()[-1] if said.getvalue().strip() else f"exit {exit_.code}"
    except Exception as err:  # noqa: BLE001 - any refusal is the finding
        return f"{type(err).__name__}: {err}"
    return "the command ran past its argument parsing without parsing them"


COMMANDS = shown_commands()
TRAIN = [c for c in COMMANDS if c[1][:2] == ["python", "train.py"]]
OTHERS = [c for c in COMMANDS if c not in TRAIN]


def test_the_pages_show_commands_of_every_entry_point():
    shown = {" ".join(argv[:3]) if argv[1:2] == ["-m"] else " ".join(argv[:2]) for _, argv in COMMANDS if argv[0] == "python"}
    assert {"python train.py", "python evaluate.py", "python generate.py", "python export.py", "python reproduce.py"} <= shown


@pytest.mark.parametrize("where, argv", OTHERS, ids=[w for w, _ in OTHERS])
def test_each_command_the_docs_show_parses(where, argv, monkeypatch):
    problem = parse(argv, monkeypatch)
    assert not problem, f"{where}: `{shlex.join(argv)}`: {problem}"


@pytest.mark.parametrize("where, argv", TRAIN, ids=[w for w, _ in TRAIN])
def test_each_train_command_the_docs_show_parses(where, argv, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # --config NAME is looked up in configs/ of the repository
    problem = parse(argv, monkeypatch)
    assert not problem, f"{where}: `{shlex.join(argv)}`: {problem}"


def test_a_flag_the_cli_does_not_know_is_caught(monkeypatch):
    """The check itself: a renamed flag fails, for argparse and for LightningCLI."""
    assert "unrecognized arguments: --prompts_file" in parse(["python", "generate.py", "--run", "runs/demo", "--out", "x",
                                                              "--prompts_file", "p.txt"], monkeypatch)
    assert parse(["python", "train.py", "--config", "demo.yaml", "--model.init_args.learning_rat", "1e-4"], monkeypatch)
    assert not parse(["python", "train.py", "--config", "demo.yaml", "--model.init_args.learning_rate", "1e-4"], monkeypatch)


def writes(argv: list[str]) -> set[str]:
    """The demo folders a shown command writes: ``train.py --config C``'s data root and run folder,
    ``python -m synthetic.phantoms OUT``, ``python -m synthetic.demo_data OUT``, a study's or script's ``--out``."""
    options = dict(zip(argv, argv[1:]))
    made = {options["--out"]} if "--out" in options else set()
    if argv[1:3] == ["-m", "synthetic.phantoms"]:
        made.add(argv[3])
    if argv[1:3] == ["-m", "synthetic.demo_data"]:
        made |= {f"{argv[3]}/{part}" for part in ("mimic", "heldout", "laion")}
    if argv[1] == "train.py" and "--config" in options:
        name = options["--config"]  # a file, or a name in configs/ (as train.py resolves it)
        path = next(p for p in (REPO / name, REPO / "configs" / name, REPO / "configs" / f"{name}.yaml") if p.is_file())
        config = yaml.safe_load(path.read_text())
        made.add(options.get("--data.init_args.root", config.get("data", {}).get("init_args", {}).get("root")))
        made.add(f"{options.get('--runs_dir', 'runs')}/{options.get('--run_name', config.get('run_name', Path(name).stem))}")
    return {str(Path(m)) for m in made if m}


def demo_inputs(argv: list[str]) -> set[str]:
    """The demo folders a shown command reads: relative paths under ``data/`` (real data lives elsewhere, e.g.
    ``/data/mimic-cxr-jpg``), and ``runs/demo``, that it does not write itself."""
    found = {str(Path(a)) for a in argv[2:] if a.startswith("data/") or Path(a) == Path("runs/demo")}
    return found - writes(argv)


QUICKSTART = next(argv for where, argv in COMMANDS if where.startswith("README.md") and argv[1] == "train.py")


@pytest.mark.parametrize("page", sorted({where.split(":")[0] for where, _ in COMMANDS}))
def test_every_demo_input_a_page_reads_is_written_by_the_quickstart_or_a_command_before_it(page):
    """A reader who ran the quickstart and follows a page top to bottom never meets a demo folder nothing made (the
    held-out phantoms of the report-conditioned and utility demos were such a folder)."""
    made = writes(QUICKSTART)
    assert {"data/phantoms", "runs/demo"} <= made
    for where, argv in COMMANDS:
        if where.split(":")[0] != page or argv[0] != "python":
            continue
        missing = demo_inputs(argv) - made
        assert not missing, (f"{where}: `{shlex.join(argv)}` reads {sorted(missing)}, which neither the quickstart "
                             f"(`{shlex.join(QUICKSTART)}`) nor a command before it on the page writes")
        made |= writes(argv)


def test_the_held_out_phantoms_command_writes_what_the_memorization_demo_audits_with(monkeypatch, tmp_path):
    """The pages' one command for ``data/phantoms_heldout`` and ``benchmarks/memorization_demo.py`` write the same set,
    so whichever runs first, the other keeps it (the demos' numbers were measured on that set)."""
    import inspect

    from synthetic import phantoms

    shown = [argv for _, argv in COMMANDS if argv[1:4] == ["-m", "synthetic.phantoms", "data/phantoms_heldout"]]
    assert len(shown) >= 2 and all(argv == shown[0] for argv in shown), shown
    asked, signature = [], inspect.signature(phantoms.write_phantom_mimic)

    def record(root, *args, **kwargs):
        bound = signature.bind(root, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        asked.append((Path(root), phantoms._normalise_args(a["n_per_finding"], a["size"], a["seed"], a["findings"],
                                                           a["split_fractions"], a["n_lateral"])))
        raise Parsed()  # stop before anything is written

    monkeypatch.setattr(phantoms, "write_phantom_mimic", record)
    monkeypatch.chdir(tmp_path)
    for argv in (shown[0], ["python", "benchmarks/memorization_demo.py"]):
        main, args = entry_point(argv)
        with pytest.raises(Parsed):
            main(list(args))
    (docs_root, docs_args), (demo_root, demo_args) = asked
    assert REPO / docs_root == demo_root and docs_args == demo_args
