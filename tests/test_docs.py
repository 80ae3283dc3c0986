"""The docs are tested (issue 16): their code runs, their contract and tables match the code.

Every fenced code block of README.md, saved_models/README.md and docs/**/*.md is found and
labelled: ```python and ```bash / ```sh / ```shell blocks run; ```text and ```json blocks are
not commands (the JSON request bodies of docs/serving.md run through an export in
tests/test_export.py). The blocks of one file
run in document order, as a reader pastes them: Python blocks in one namespace in this process,
shell blocks in `bash`, all in one temporary working directory, a "checkout" whose
`../shared/data` holds the real MNIST and Frey Face files (links; a file that needs them is
skipped when they are absent). Nothing is written into the repository.

What a block needs to run here is said by HTML comments right above it, visible in the source
(docs/testing.md describes them):

    <!-- test: replace "OLD" "NEW" [why] -->   run the block with OLD replaced (a tiny budget);
                                               OLD must occur in the block
    <!-- test: skip: WHY -->                   not run (counted, and the reason reported)
    <!-- test: parse-only: WHY -->             a shell block whose `keras-aevb` commands are
                                               parsed by the program's own parser, not run

The serving contract (the signature tables of docs/serving.md) is compared with the signatures of
real exports, one per posterior family; the CLI synopsis of docs/cli.md with the CLI's parser;
the families table of docs/families.md with `keras_aevb.posterior_families()`; relative links
and their anchors with the files they point to.
"""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from keras_aevb import data as data_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [
    ROOT / "README.md",
    ROOT / "saved_models" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
PYTHON = {"python"}
SHELL = {"bash", "sh", "shell"}
NOT_RUN = {"text", "json"}
# Skipped and parse-only blocks together: a new one must be a deliberate choice.
MAX_NOT_RUN_BLOCKS = 8
DATA_SETS = ("mnist", "frey_face")

MARKER = re.compile(r"^<!-- test: (.*) -->$")
FENCE = re.compile(r"^(\s*)```(.*)$")


@dataclasses.dataclass
class Marker:
    kind: str  # "replace", "skip" or "parse-only"
    reason: str = ""
    old: str = ""
    new: str = ""


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int
    lang: str
    code: str
    markers: list

    @property
    def where(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def kind(self, kind):
        return next((m for m in self.markers if m.kind == kind), None)

    def code_to_run(self):
        code = self.code
        for marker in self.markers:
            if marker.kind == "replace":
                code = code.replace(marker.old, marker.new)
        return code


def _marker(text, where):
    for kind in ("skip", "parse-only"):
        if text.startswith(f"{kind}:"):
            reason = text[len(kind) + 1 :].strip()
            assert reason, f"{where}: a {kind} marker says why"
            return Marker(kind, reason=reason)
    if text.startswith("replace "):
        words = shlex.split(text[len("replace ") :])
        assert len(words) >= 2, f"{where}: replace takes two quoted strings, OLD and NEW"
        return Marker("replace", reason=" ".join(words[2:]), old=words[0], new=words[1])
    raise AssertionError(f"{where}: unknown test marker {text!r}")


def parse_blocks(path):
    """The fenced code blocks of a Markdown file, each with the test markers right above it."""
    lines = path.read_text().splitlines()
    blocks, pending, i = [], [], 0
    while i < len(lines):
        where = f"{path.relative_to(ROOT)}:{i + 1}"
        marker = MARKER.match(lines[i].strip())
        fence = FENCE.match(lines[i])
        if marker:
            pending.append(_marker(marker.group(1).strip(), where))
        elif fence:
            indent, lang = fence.group(1), fence.group(2).strip()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            assert end < len(lines), f"{where}: the code block is not closed"
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines]
            code = "\n".join(body[i + 1 : end]) + "\n"
            blocks.append(Block(path, i + 1, lang, code, pending))
            pending, i = [], end
        elif pending:
            raise AssertionError(f"{where}: a test marker must stand right above a code block")
        i += 1
    assert not pending, f"{path.relative_to(ROOT)}: a test marker at the end, above no block"
    return blocks


def _runnable(path):
    return [b for b in parse_blocks(path) if b.lang in PYTHON | SHELL]


def _id(path):
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------- the blocks


@pytest.mark.parametrize("path", DOC_FILES, ids=_id)
def test_every_code_block_is_labelled_and_its_markers_fit_it(path):
    for block in parse_blocks(path):
        assert block.lang in PYTHON | SHELL | NOT_RUN, (
            f"{block.where}: a code block names its language: python or bash to run, text or "
            f"json for what is not a command (got {block.lang!r})"
        )
        kinds = [m.kind for m in block.markers]
        if block.lang in NOT_RUN:
            assert not kinds, f"{block.where}: test markers above a {block.lang} block"
        assert kinds.count("skip") + kinds.count("parse-only") <= 1, block.where
        assert not ("skip" in kinds and "replace" in kinds), f"{block.where}: skipped: no replace"
        if "parse-only" in kinds:
            assert block.lang in SHELL, f"{block.where}: parse-only is for shell blocks"
        for marker in block.markers:
            if marker.kind == "replace":
                assert marker.old in block.code, (
                    f"{block.where}: the marker replaces {marker.old!r}, which the block no "
                    "longer holds"
                )
        runs = block.lang in SHELL and not ({"skip", "parse-only"} & set(kinds))
        if runs:  # a block that runs must not reach outside its temporary directory
            code = block.code_to_run()
            assert "~/" not in code and "$HOME" not in code, f"{block.where} writes under ~"


def test_skipped_blocks_are_few_and_say_why(capsys):
    not_run = [
        (block.where, marker.kind, marker.reason)
        for path in DOC_FILES
        for block in parse_blocks(path)
        for marker in block.markers
        if marker.kind in ("skip", "parse-only")
    ]
    with capsys.disabled():
        print(f"\n{len(not_run)} doc code blocks are not run here:")
        for where, kind, reason in not_run:
            print(f"  {where} ({kind}): {reason}")
    for where, _, reason in not_run:
        assert len(reason.split()) >= 4, f"{where}: say why the block cannot run here"
    assert len(not_run) <= MAX_NOT_RUN_BLOCKS, "more blocks skipped than the docs promise"


def test_the_readme_test_command_is_what_ci_runs():
    (block,) = [b for b in _runnable(ROOT / "README.md") if "pytest" in b.code]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    command = ci[-1].replace(" -q ", " ")  # CI's pip is quiet; the command is the same
    assert block.code.split() == command.split()


def _data_links(tmp_path):
    """tmp/checkout (the working directory) beside tmp/shared/data/<set> -> the real files."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    missing = []
    for name in DATA_SETS:
        found = data_lib.default_data_dir(name)
        if found is None:
            missing.append(name)
        else:
            (shared / name).symlink_to(pathlib.Path(found).resolve(), target_is_directory=True)
    return checkout, missing


# What in a block reads a data set's real files.
DATA_READS = {
    "mnist": ("shared/data/mnist", "load_mnist", "--dataset mnist"),
    "frey_face": ("shared/data/frey_face", "load_frey_face", "--dataset frey_face"),
}


def _needs_data(blocks):
    text = "".join(b.code for b in blocks if not b.kind("skip") and not b.kind("parse-only"))
    return [name for name in DATA_SETS if any(read in text for read in DATA_READS[name])]


def _checkout_changes():
    """The checkout's modified and untracked files (git), or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.splitlines()) if done.returncode == 0 else None


def _shell_env():
    path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ["PATH"]])
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PATH=path, PYTHONPATH=python_path)


SHELL_PRELUDE = """set -euo pipefail
command -v keras-aevb >/dev/null || keras-aevb() { python3 -m keras_aevb "$@"; }
"""


def _run_shell(block, cwd):
    done = subprocess.run(
        ["bash", "-c", SHELL_PRELUDE + block.code_to_run()],
        cwd=cwd,
        env=_shell_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{block.where}: the shell block exited with {done.returncode}:\n"
            f"{block.code_to_run()}\n--- stdout\n{done.stdout[-3000:]}\n"
            f"--- stderr\n{done.stderr[-5000:]}"
        )


def _parse_only(block, tmp_path):
    """Runs the block with `keras-aevb` (and `python3 -m keras_aevb`) recording its arguments,
    and no other program reachable; then parses each command with the CLI's own parser."""
    from keras_aevb import cli

    log = tmp_path / "argv.jsonl"
    log.unlink(missing_ok=True)
    record = "import json, sys; print(json.dumps(sys.argv[1:]))"
    stub = (
        "set -euo pipefail\nPATH=/nonexistent\n"
        f'keras-aevb() {{ {shlex.quote(sys.executable)} -c {shlex.quote(record)} "$@" '
        f">> {shlex.quote(str(log))}; }}\n"
        'python3() { if [ "${1:-}" = -m ] && [ "${2:-}" = keras_aevb ]; then shift 2; '
        'keras-aevb "$@"; else echo "python3 $*: not a keras-aevb command" >&2; return 127; fi; }\n'
    )
    done = subprocess.run(
        ["bash", "-c", stub + block.code_to_run()], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{block.where}: {done.stderr}"
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert commands, f"{block.where}: a parse-only block without a keras-aevb command"
    for argv in commands:
        try:
            cli._parse(cli.build_parser(), argv)
        except cli.UsageError as error:
            pytest.fail(f"{block.where}: keras-aevb {shlex.join(argv)}: {error}")
    return len(commands)


def _readme_postconditions(namespace):
    assert namespace["model"].built  # the quickstart's model trained


def _serving_postconditions(namespace):
    # The anomaly recipe's claim: the 8 test digits pass, the 8 noise images are flagged.
    is_anomaly = namespace["is_anomaly"]
    assert not is_anomaly[:8].any() and is_anomaly[8:].all(), is_anomaly


POSTCONDITIONS = {
    "README.md": _readme_postconditions,
    "docs/serving.md": _serving_postconditions,
}


def _run_param(path):
    # A file that reads the real data sets reads them in full: slow, like the other such tests.
    # A file whose markers do not parse is collected all the same: its test reports the error.
    try:
        slow = bool(_needs_data(_runnable(path)))
    except AssertionError:
        slow = False
    return pytest.param(path, id=_id(path), marks=[pytest.mark.slow] if slow else [])


def _has_code(path):
    try:
        return bool(_runnable(path))
    except AssertionError:
        return True


RUN_FILES = [path for path in DOC_FILES if _has_code(path)]


@pytest.mark.parametrize("path", [_run_param(p) for p in RUN_FILES])
def test_the_code_blocks_run_in_order(path, tmp_path, monkeypatch, capsys):
    blocks = _runnable(path)
    checkout, missing = _data_links(tmp_path)
    needed = [name for name in _needs_data(blocks) if name in missing]
    if needed:
        pytest.skip(f"needs the real data: ../shared/data/{needed[0]}")
    before = _checkout_changes()
    monkeypatch.chdir(checkout)
    namespace = {"__name__": "__main__"}
    counts = dict(ran=0, substituted=0, skipped=0, parsed=0)
    for block in blocks:
        if block.kind("skip"):
            counts["skipped"] += 1
            continue
        if block.kind("parse-only"):
            _parse_only(block, tmp_path)
            counts["parsed"] += 1
            continue
        counts["substituted"] += bool(block.kind("replace"))
        if block.lang in SHELL:
            _run_shell(block, checkout)
        else:
            try:
                exec(compile(block.code_to_run(), block.where, "exec"), namespace)  # noqa: S102
            except Exception as error:
                raise AssertionError(f"{block.where}: the Python block raised") from error
        counts["ran"] += 1
    check = POSTCONDITIONS.get(_id(path))
    if check:
        check(namespace)
    with capsys.disabled():
        print(f"\n{_id(path)}: {counts}")
    if before is not None:  # the snippets wrote into their temporary directory only
        assert _checkout_changes() == before


# ---------------------------------------------------------------------------- links


def _slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    anchors, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"^#+ (.*)$", line)):
            anchors.add(_slug(match.group(1)))
    return anchors


@pytest.mark.parametrize("path", DOC_FILES, ids=_id)
def test_relative_links_and_their_anchors_resolve(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{_id(path)}: the link {target} points nowhere"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{_id(path)}: no heading #{anchor} in {target}"


# ---------------------------------------------------------------------------- the CLI synopsis


def _synopsis():
    """{command: flags} of docs/cli.md's synopsis; "" for the program's own flags."""
    (block,) = [
        b for b in parse_blocks(ROOT / "docs" / "cli.md") if b.code.startswith("keras-aevb ")
    ]
    commands, current = {}, None
    for line in block.code.splitlines():
        match = re.match(r"^keras-aevb (\[--[^\]]*\] )*([a-z]+)?", line)
        if match and not line.startswith(" "):
            current = "" if "COMMAND" in line else match.group(2)
            commands[current] = set()
        commands[current] |= set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line))
    return commands


def test_the_cli_synopsis_lists_every_command_and_flag_and_no_other():
    import argparse

    from keras_aevb import cli

    parser = cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]

    def flags(p):
        return {o for a in p._actions for o in a.option_strings if o.startswith("--")} - {"--help"}

    documented = _synopsis()
    real = {"": flags(parser)} | {name: flags(p) for name, p in subparsers.choices.items()}
    assert sorted(documented) == sorted(real)
    for command, expected in real.items():
        assert documented[command] == expected, f"keras-aevb {command}".strip()


# ---------------------------------------------------------------------------- the families table


def _table(text, header):
    """The rows of the Markdown table under `header` (a line), as lists of cells."""
    lines = text.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_the_families_table_is_the_codes():
    import keras_aevb

    text = (ROOT / "docs" / "families.md").read_text()
    header = "| posterior | support | encoder outputs | z = g(eps, phi) | analytic KL with priors |"
    supports = {"real": "real", "positive": "positive", "(0, 1)": "unit_interval"}
    documented = {
        re.sub(r"`", "", row[0]): (
            supports[row[1]],
            re.findall(r"`(\w+)`", row[2]),
            "implicit" if "implicit" in row[3] else "explicit",
            [] if row[4] == "-" else [p.strip() for p in row[4].split(",")],
        )
        for row in _table(text, header)
    }
    real = {
        row["name"]: (
            row["support"],
            list(row["parameters"]),
            row["reparameterization"],
            list(row["analytic_kl_priors"]),
        )
        for row in keras_aevb.posterior_families()
    }
    assert documented == real


# ---------------------------------------------------------------------------- the serving contract

SPEC = re.compile(r"`(<?\w+>?)` (float32|float64|int32|int64) `\[([^\]]*)\]`")
SIGNATURE_HEADER = "| signature | inputs | outputs |"
FAMILY_HEADER = "| posterior | `encode` outputs |"
LATENT = 2  # the tiny models' latent_dim


def _specs(cell):
    """{name: (dtype, dims, gaussian_only)} of a contract cell; specs written after the words
    "Gaussian decoder" hold for a Gaussian decoder only."""
    gaussian_from = cell.find("Gaussian decoder")
    specs = {}
    for match in SPEC.finditer(cell):
        name, dtype, dims = match.groups()
        dims = [d.strip() for d in dims.split(",") if d.strip()]
        specs[name] = (dtype, dims, gaussian_from != -1 and match.start() > gaussian_from)
    return specs


def serving_contract():
    """({signature: (inputs, outputs)}, {family: encode outputs or None}) of docs/serving.md."""
    text = (ROOT / "docs" / "serving.md").read_text()
    signatures = {
        re.sub(r"`", "", name): (_specs(inputs), _specs(outputs))
        for name, inputs, outputs in _table(text, SIGNATURE_HEADER)
    }
    families = {
        re.sub(r"`", "", name): re.findall(r"`(\w+)`", outputs) or None
        for name, outputs in _table(text, FAMILY_HEADER)
    }
    return signatures, families


def _shape(dims, event_shape, latent_dim):
    shape = []
    for d in dims:
        if d == "None":
            shape.append(None)
        elif d == "*event_shape":
            shape.extend(event_shape)
        elif d == "latent_dim":
            shape.append(latent_dim)
        else:
            shape.append(int(d))
    return tuple(shape)


def expected_signatures(params, event_shape, latent_dim, gaussian):
    """What docs/serving.md promises for one model: {signature: (inputs, outputs)}, each
    {name: (dtype, shape)}."""
    signatures, _ = serving_contract()
    expected = {}
    for signature, (inputs, outputs) in signatures.items():
        sides = []
        for specs in (inputs, outputs):
            side = {}
            for name, (dtype, dims, gaussian_only) in specs.items():
                if gaussian_only and not gaussian:
                    continue
                for real_name in params if name == "<parameter>" else [name]:
                    side[real_name] = (dtype, _shape(dims, event_shape, latent_dim))
            sides.append(side)
        expected[signature] = tuple(sides)
    return expected


def actual_signatures(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)

    def specs(structure):
        return {k: (s.dtype.name, tuple(s.shape.as_list())) for k, s in structure.items()}

    return {
        name: (specs(fn.structured_input_signature[1]), specs(fn.structured_outputs))
        for name, fn in loaded.signatures.items()
    }


def test_the_contract_tables_name_every_signature_and_family():
    from keras_aevb.export import SIGNATURE_NAMES
    from keras_aevb.families import FAMILIES

    signatures, families = serving_contract()
    assert sorted(signatures) == sorted(SIGNATURE_NAMES)
    assert sorted(families) == sorted(FAMILIES)
    for signature, (inputs, outputs) in signatures.items():
        assert inputs and outputs, f"docs/serving.md: the {signature} row names no tensors"


def _tiny_model(posterior, decoder_cls, event_shape):
    """A small model of `posterior` under the first named prior it accepts (test_export.py's
    choice: priors with a closed-form quantile first, which keep the sample graph short)."""
    import keras

    import keras_aevb

    preferred = ("standard_normal", "exponential", "uniform")
    names = [*preferred, *sorted(set(keras_aevb.PRIORS) - set(preferred))]
    init = keras.initializers.GlorotUniform(seed=0)
    for prior in names:
        try:
            encoder = keras_aevb.MLPEncoder(
                LATENT, (16,), posterior=posterior, kernel_initializer=init
            )
            decoder = decoder_cls(event_shape, (16,), kernel_initializer=init)
            model = keras_aevb.AEVB(encoder, decoder, posterior=posterior, prior=prior, seed=0)
        except ValueError:
            continue
        model.build((None, *event_shape))
        return model
    raise AssertionError(f"no named prior accepts the {posterior!r} posterior")


@pytest.fixture(scope="module")
def mnist_export(tmp_path_factory):
    """An export with the paper's MNIST shapes (28 x 28, J = 20; 16 hidden units)."""
    import keras_aevb
    from keras_aevb.export import export_saved_model

    model = keras_aevb.paper_model("mnist", 20, hidden_units=16, seed=0)
    path = export_saved_model(model, tmp_path_factory.mktemp("contract") / "mnist_vae")
    return model, path


def _family_param(name):
    fast = name in ("normal", "cauchy")  # cauchy is refused before anything is traced
    return pytest.param(name, marks=[] if fast else [pytest.mark.slow])


@pytest.mark.parametrize("family", [_family_param(f) for f in serving_contract()[1]])
def test_an_export_has_the_documented_signatures(family, mnist_export, tmp_path):
    import keras_aevb
    from keras_aevb.export import export_saved_model

    params = serving_contract()[1][family]
    if family == "normal":
        model, path = mnist_export
        event_shape, latent_dim = (28, 28), 20
    else:
        event_shape, latent_dim = (28, 28), LATENT
        model = _tiny_model(family, keras_aevb.BernoulliDecoder, event_shape)
        if params is None:  # documented as not exported
            with pytest.raises(ValueError, match="has no mean"):
                export_saved_model(model, tmp_path / "m")
            return
        path = export_saved_model(model, tmp_path / "m")
    assert params is not None, f"docs/serving.md says {family} is not exported, but it is"
    expected = expected_signatures(params, event_shape, latent_dim, gaussian=False)
    assert actual_signatures(path) == expected


def test_a_gaussian_decoders_export_has_the_documented_signatures(tmp_path):
    import keras_aevb
    from keras_aevb.export import export_saved_model

    event_shape = (28, 20)  # Frey Face's
    model = _tiny_model("normal", keras_aevb.GaussianDecoder, event_shape)
    path = export_saved_model(model, tmp_path / "frey_vae")
    params = serving_contract()[1]["normal"]
    expected = expected_signatures(params, event_shape, LATENT, gaussian=True)
    assert actual_signatures(path) == expected
