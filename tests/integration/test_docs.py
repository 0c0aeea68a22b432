"""The documentation site builds without a single warning, and its CLI reference is
generated from the click commands themselves (sphinx-click), so it cannot drift from them."""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from clpipe.cli import cli, flywheel_sync_cli
from clpipe.cli.modulefile import modulefile_cli

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    try:
        import myst_parser  # noqa: F401
        import sphinx  # noqa: F401
        import sphinx_click  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the docs extras are not installed ({exc}); run scripts/setup.sh (it installs .[test,docs])")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(out / "doctrees"),
            str(ROOT / "docs"),
            str(out / "html"),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"sphinx-build -W failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.strip() == "", proc.stderr  # -q: only warnings and errors would be printed
    return out / "html"


def option_signatures(page: Path) -> set[str]:
    """The option names Sphinx documented as objects (``.. option::``) on a page."""
    text = page.read_text(encoding="utf-8")
    names = set()
    for dt in re.findall(r'<dt class="sig sig-object std" id="cmdoption-[^"]*">(.*?)</dt>', text, re.S):
        names.update(html.unescape(n) for n in re.findall(r'<span class="sig-name descname"><span class="pre">([^<]*)</span>', dt))
    return names


def page_text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def option_names(command: click.Command) -> set[str]:
    return {name for p in command.params if isinstance(p, click.Option) and not p.hidden for name in (*p.opts, *p.secondary_opts)}


def visible_commands(group: click.Group, prefix: str = "clpipe"):
    for name, command in group.commands.items():
        if command.hidden:
            continue
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from visible_commands(command, f"{prefix} {name}")


def test_flywheel_sync_page_documents_every_option_of_the_command(site):
    documented = option_signatures(site / "flywheel-sync.html")
    assert {
        "-config_file",
        "-c",
        "--config-file",
        "-submit",
        "-s",
        "--submit",
        "-engine",
        "--engine",
        "-batch_config",
        "-after",
        "-source_url",
        "-dropoff_dir",
        "-temp_dir",
        "-debug",
    } <= documented
    assert option_names(flywheel_sync_cli) <= documented
    text = page_text(site / "flywheel-sync.html")
    assert ".. click::" not in text and ".. option::" not in text  # the directive ran as reST, not as text
    assert "clpipe dicom flywheel_sync [OPTIONS]" in text
    assert flywheel_sync_cli.help.splitlines()[0].split("`")[0] in text


def test_cli_reference_covers_every_visible_command(site):
    text = page_text(site / "cli.html")
    documented = option_signatures(site / "cli.html")
    commands = list(visible_commands(cli))
    assert {path for path, _ in commands} >= {"clpipe dicom", "clpipe dicom flywheel_sync", "clpipe project_setup", "clpipe modulefile"}
    for path, command in commands:
        assert f"{path} [OPTIONS]" in text, f"{path} is missing from the CLI reference"
        assert option_names(command) <= documented, path
    assert "_run_plan" not in text  # hidden commands stay out


def test_modulefile_and_project_setup_pages_document_their_options(site):
    assert option_names(modulefile_cli) <= option_signatures(site / "cluster-module.html")
    assert {"-project_title", "-project_dir", "-source_url", "-profile"} <= option_signatures(site / "project-setup.html")


def test_every_page_is_in_the_toctree_and_the_design_notes_are_kept(site):
    index = (site / "index.html").read_text(encoding="utf-8")
    for page in (
        "install",
        "project-setup",
        "flywheel-sync",
        "engines",
        "other-sources",
        "batch",
        "troubleshooting",
        "cli",
        "exit-codes",
        "cluster-module",
        "developer/sync-engine",
    ):
        assert (site / f"{page}.html").is_file(), page
        assert f'href="{page}.html"' in index, page


# ----------------------------------------------------------------------------- troubleshooting

SOURCES = ROOT / "src" / "clpipe" / "sources"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
# The exceptions whose text a user reads (printed as `clpipe: error: ...` or `FAILED ...: ...`).
MESSAGE_CALLS = {"ConfigError", "PreflightError", "PermanentError", "TransientError", "Released", "RuntimeError"}
# Lists of notes printed after a run: FolderStats.notes() builds `out`, DicomWebSource keeps `self.notes`.
NOTE_LISTS = {"out", "notes"}
# Raised messages that a user never sees (a phrase of each), with the reason.
NOT_PRINTED = {
    "instead of an association request": "raised in the C-MOVE storage SCP's thread, which catches it and aborts",
}
# Message text built outside a raise (helpers, hints, reasons chosen at run time), and the
# DICOM messages of the config, the CLI and the engine. Each phrase must be in its source
# file (read through ast.unparse, so a phrase may span implicitly joined literals, and
# quotes are not escaped) and on the page; `{...}` names a value filled in at run time.
EXTRA_PHRASES = {
    "sources/dimse/association.py": [
        "the host name",
        "is not known; check the SourceURL",
        "check the host and port in the SourceURL and that the PACS is running",
        "check the host and port, and that a firewall lets this machine through",
        "check the host, the port and the network",
        "no reason given",
    ],
    "sources/dimse/pdu.py": [
        "temporary congestion",
        "local limit exceeded",
        "application context not supported",
        "protocol version not supported",
    ],
    "sources/dimse/source.py": [
        "and that a firewall lets it connect there",
        "the PACS may hold a SOP class or transfer syntax clpipe did not offer",
        "instances arrived, ",
        "sub-operations failed; ",
    ],
    "sources/dicomweb.py": [
        "connection refused",
        "unknown host name",
        "the token in",
        "no credentials",
        "the user name and password in",
        "answered HTTP",
    ],
    "config/loader.py": [
        'is "move": set ',
        "to the port on which this machine receives the images (the PACS must know our AE title at that port)",
        "the fw-cli engine syncs only from Flywheel (fw://); remove ",
        'expected an object such as {{"PatientID": "SUBJ*"}}, found ',
        "expected a whole number of studies (0: no limit)",
        "expected text (DICOM wildcards * and ? allowed)",
    ],
    "config/options.py": [  # the checks declared with each SourceOptions key
        "expected an AE title of 1-16 ASCII characters without a backslash",
        'expected "get" (C-GET) or "move" (C-MOVE, which needs MovePort)',
        "expected a TCP port number (1-65535), or 0 for none",
        "no such file",
        "expected a file path as text",
    ],
    "layout.py": ["uses no field, so every series would land in one folder; use e.g. {{subject}}/{{session}}/{{series}}"],
    "plan.py": [
        "is an fw sync option for Flywheel projects; a DICOM source takes only -j/--jobs, -n/--dry-run, "
        "-l/--list-only, -v, --delete, --quiet, --debug, -y and --ca-certs; filter with the Query block instead",
    ],
    "cli/__init__.py": [
        "flywheel_sync syncs Flywheel projects (fw://group/project/); use `clpipe dicom sync` for DICOMweb, DIMSE and file:// sources",
        "the query flags (-patient_id, -study_date, ...) are for DICOM sources; filter a Flywheel project with "
        "CommandLineOpts (e.g. --include-container-tags)",
    ],
    "sync/engine.py": [
        "of the series' ",
        "the series has no instances to retrieve",
        "--delete: the source listed nothing, so all ",
        "files synced before would be removed; nothing was deleted (check the source, e.g. that its share is mounted)",
        "still to sync",
        "the journal of this run (the dropoff's .clpipe-sync folder)",
        "set DropoffDirectory elsewhere",
        "set TempDirectory elsewhere",
        # local names (issue 11)
        "renamed: their names collided with another's or were not portable (see 'Local names' in docs/engines.md)",
        "files synced under earlier names ",
        "renamed in place (nothing downloaded)",
    ],
    "sync/reports.py": ["the audit log ", " and the summary "],
    # a full disk, in any step (issue 11): the one line and its parts
    "errors.py": ["no space left", "disk quota exceeded", "then run again: finished files are kept", "free space", "needed for "],
    "engines/native.py": [
        "this sync's bookkeeping (the dropoff's .clpipe-sync folder; a large listing in TempDirectory)",
        "the manifest of the synced files (the dropoff's .clpipe-sync folder)",
        "the sync's lock",
    ],
    "batch/local.py": [
        "the rest of this run's log",
        "misses the end of this run's output",
        "the console has it all",
        "the run goes on without it",
        "the clpipe installation was probably moved or removed: install it again",
    ],
}


def _shared_tuples(trees: list[ast.Module]) -> dict[str, ast.Tuple]:
    """Module-level tuples of constants (``DICOMWEB_CREDENTIALS = ("...", ...)``), by name,
    for modules that unpack one imported from another."""
    return {
        node.targets[0].id: node.value
        for tree in trees
        for node in tree.body
        if isinstance(node, ast.Assign)
        and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and isinstance(node.value, ast.Tuple)
    }


def _module_words(tree: ast.Module, shared: dict[str, ast.Tuple] | None = None) -> dict[str, str]:
    """Module-level one-word text constants (``TOKEN_VAR = "CLPIPE_DICOMWEB_TOKEN"``,
    ``A, B = "...", "..."``, ``A, B = SHARED_TUPLE``), read through so that messages naming
    them are read whole. Longer constants (hints such as LOGIN_HINT) are a tail the page may
    abbreviate as ``...``: they count as run-time values."""
    known: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if isinstance(value, ast.Name) and value.id in (shared or {}):
            value = shared[value.id]
        pairs = (
            zip(target.elts, value.elts, strict=False)
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
            else [(target, value)]
        )
        for name, item in pairs:
            if (
                isinstance(name, ast.Name)
                and isinstance(item, ast.Constant)
                and isinstance(item.value, str)
                and item.value
                and " " not in item.value
            ):
                known[name.id] = item.value
    return known


def _text_parts(node: ast.AST, known: dict[str, str], local: dict[str, ast.AST]) -> list[str | None]:
    """The fixed text of a message expression: strings, with ``None`` where a value is
    filled in at run time. One-word module constants and local message variables
    (``what = f"series {uid}"``) are read through."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and node.id in known:
        return [known[node.id]]
    if isinstance(node, ast.Name) and node.id in local:
        return _text_parts(local.pop(node.id), known, local)  # popped: no loops
    if isinstance(node, ast.JoinedStr):
        parts: list[str | None] = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                plain = value.conversion == -1 and value.format_spec is None
                parts += _text_parts(value.value, known, local) if plain else [None]
            else:
                parts += _text_parts(value, known, local)
        return parts
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text_parts(node.left, known, local) + _text_parts(node.right, known, local)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("rstrip", "strip"):
        return _text_parts(node.func.value, known, local)
    return [None]


def _phrases(parts: list[str | None]) -> list[str]:
    """The runs of fixed text between run-time values, whitespace normalised, trimmed of
    edge punctuation; those of at least three words."""
    runs, current = [], ""
    for part in parts + [None]:
        if part is None:
            runs.append(" ".join(current.split()).strip(" :;,.()"))
            current = ""
        else:
            current += part
    return [run for run in runs if len(run.split()) >= 3]


def source_messages() -> dict[str, list[list[str]]]:
    """The messages of src/clpipe/sources/*.py and of its packages' modules (*/*.py), by
    file (its path under sources/), each as its distinctive fixed phrases: the text of every
    ConfigError/PreflightError/PermanentError/TransientError(...) (raised or returned) and
    of every note appended to a note list."""
    found: dict[str, list[list[str]]] = {}
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in sorted([*SOURCES.glob("*.py"), *SOURCES.glob("*/*.py")])}
    shared = _shared_tuples(list(trees.values()))
    for path, tree in trees.items():
        known = _module_words(tree, shared)
        messages: list[list[str]] = []
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            local = {
                n.targets[0].id: n.value
                for n in ast.walk(function)
                if isinstance(n, ast.Assign)
                and len(n.targets) == 1
                and isinstance(n.targets[0], ast.Name)
                and isinstance(n.value, (ast.JoinedStr, ast.Constant))
            }
            for call in ast.walk(function):
                if not (isinstance(call, ast.Call) and call.args):
                    continue
                func = call.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                owner = func.value if isinstance(func, ast.Attribute) else None
                owner_name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
                if name in MESSAGE_CALLS or (name == "append" and owner_name in NOTE_LISTS):
                    phrases = _phrases(_text_parts(call.args[0], known, dict(local)))
                    if phrases and phrases not in messages:
                        messages.append(phrases)
        found[path.relative_to(SOURCES).as_posix()] = messages
    return found


def _normalised(text: str) -> str:
    return " ".join(text.split())


def test_troubleshooting_lists_every_message_of_the_sources():
    """Each fixed phrase of every message in src/clpipe/sources/*.py is on the
    troubleshooting page (its markdown, whitespace normalised), so a new or reworded
    message fails here until the page says what it means and what to do."""
    page = _normalised(TROUBLESHOOTING.read_text(encoding="utf-8"))
    found = source_messages()
    # the extraction itself works: many messages from every source, read whole where
    # they are built from constants and from local variables
    assert sum(len(m) for m in found.values()) > 100, found
    for name in ("dicom.py", "dicomweb.py", "dimse/association.py", "dimse/source.py", "dimse/wire.py", "localdir.py", "flywheel.py"):
        assert len(found[name]) >= 5, (name, found[name])
    flat = {p for messages in found.values() for m in messages for p in m}
    assert (
        "set either CLPIPE_DICOMWEB_TOKEN (a Bearer token) or CLPIPE_DICOMWEB_USER and CLPIPE_DICOMWEB_PASSWORD, not both"
    ) in flat  # module constants read through
    assert "the DICOMweb server at" in flat and "series gone (deleted from the server since it was listed?" in flat
    assert "skipped" not in flat and "clpipe dropoff folders inside the source (e.g" in flat  # notes, split at counts
    missing, unused = [], dict(NOT_PRINTED)
    for name, messages in found.items():
        for phrases in messages:
            if any(key in p for p in phrases for key in NOT_PRINTED):
                unused = {k: v for k, v in unused.items() if not any(k in p for p in phrases)}
                continue
            missing += [f"{name}: {p}" for p in phrases if p not in page]
    assert not unused, f"NOT_PRINTED names messages that no longer exist: {unused}"
    assert not missing, "messages missing from docs/troubleshooting.md:\n" + "\n".join(missing)


def test_troubleshooting_lists_the_dicom_messages_of_config_cli_and_engine():
    page = _normalised(TROUBLESHOOTING.read_text(encoding="utf-8"))
    problems, count = [], 0
    for rel, phrases in EXTRA_PHRASES.items():
        code = ast.unparse(ast.parse((ROOT / "src" / "clpipe" / rel).read_text(encoding="utf-8")))
        for phrase in phrases:
            count += 1
            if phrase not in code:
                problems.append(f"not in src/clpipe/{rel} any more (update EXTRA_PHRASES and the page): {phrase!r}")
            elif _normalised(phrase.replace("{{", "{").replace("}}", "}")) not in page:
                problems.append(f"missing from docs/troubleshooting.md: {phrase!r} (src/clpipe/{rel})")
    assert count >= 15
    assert not problems, "\n".join(problems)


def test_the_dicom_troubleshooting_sections_are_on_the_built_page(site):
    text = page_text(site / "troubleshooting.html")
    for heading in (
        "DICOM sources (clpipe dicom sync)",
        "DICOM sources (PACS, DICOMweb, folders)",
        "PACS (dimse://)",
        "Folders (file://)",
        "Notes after a DICOM sync",
    ):
        assert heading in text, heading
    assert 'href="#dicom-sources-clpipe-dicom-sync"' in (site / "troubleshooting.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- SourceOptions keys
# Each key is declared once, in src/clpipe/config/options.py: the docs' tables are generated
# from the declarations, and the prose around them must name the same keys, spell them the
# same way in both dialects and give the same defaults.

DOCS = ROOT / "docs"
GENERATED_TABLE = re.compile(
    r"<!-- generated: python -m clpipe\.config\.options (\w+) [^>]*-->\n(.*?)<!-- end of the generated table -->", re.DOTALL
)


def _definition_terms(text: str) -> list[tuple[str, str]]:
    """The terms of a page's definition lists ("term\\n: definition"), each with its definition."""
    lines = text.splitlines()
    terms = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() and lines[i + 1].startswith(": "):
            body = [lines[i + 1][2:]]
            for more in lines[i + 2 :]:
                if not more.startswith("  "):
                    break
                body.append(more.strip())
            terms.append((line, " ".join(body)))
    return terms


def test_the_option_tables_in_the_docs_are_generated_from_the_declarations():
    from clpipe.config.options import QUERY_OPTIONS, SOURCE_OPTIONS, markdown_table

    found = {}
    for page in sorted(DOCS.glob("*.md")):
        for which, table in GENERATED_TABLE.findall(page.read_text(encoding="utf-8")):
            found[which] = page.name
            assert table == markdown_table(which), (
                f"docs/{page.name}: the {which} table is not what src/clpipe/config/options.py declares; replace it "
                f"with the output of `python -m clpipe.config.options {which}`"
            )
    assert found == {"source": "flywheel-sync.md", "query": "other-sources.md"}
    # one row per declared key, in both spellings
    for which, options in (("source", SOURCE_OPTIONS), ("query", QUERY_OPTIONS)):
        rows = markdown_table(which).splitlines()[2:]
        assert [row.split(" | ")[0] for row in rows] == [f"| `{o.legacy}` / `{o.snake}`" for o in options]
    assert len(SOURCE_OPTIONS) >= 18 and len(QUERY_OPTIONS) == 7


def test_the_prose_names_every_declared_key_with_its_spelling_and_default():
    """The definition lists of flywheel-sync and other-sources explain every SourceOptions
    key and no other; the troubleshooting page names only declared keys; every
    "`Legacy` / `snake`" or "`Legacy` (`snake`)" pair on any page (README too) is a declared
    pair; and a "Default: `x`" in a key's definition is its declared default."""
    from clpipe.config.options import QUERY_OPTION, SOURCE_OPTION, SOURCE_OPTIONS
    from clpipe.sources.dicom import DEFAULT_TEMPLATE

    by_legacy = {o.legacy: o for o in (*SOURCE_OPTION.values(), *QUERY_OPTION.values())}
    problems, explained, defaults_checked = [], set(), 0
    for name in ("flywheel-sync.md", "other-sources.md"):
        for term, body in _definition_terms((DOCS / name).read_text(encoding="utf-8")):
            keys = re.findall(r"`([A-Z][A-Za-z]+)`", term)
            explained.update(keys)
            problems += [f"docs/{name}: `{k}` is no SourceOptions key" for k in keys if k not in by_legacy]
            default = re.search(r"\b[Dd]efault:? (?:`([^`]+)`|(\d+)\b)", body)
            if len(keys) == 1 and keys[0] in by_legacy and default:
                defaults_checked += 1
                shown = default.group(1) or default.group(2)
                option = by_legacy[keys[0]]
                expected = DEFAULT_TEMPLATE if (option.snake, name) == ("layout_template", "other-sources.md") else str(option.default)
                if shown != expected:
                    problems.append(f"docs/{name}: {keys[0]} defaults to {expected!r}, not {shown!r}")
    problems += [
        f"{o.legacy} is not explained in docs/flywheel-sync.md or docs/other-sources.md"
        for o in SOURCE_OPTIONS
        if o.legacy not in explained
    ]
    for term, _ in _definition_terms((DOCS / "troubleshooting.md").read_text(encoding="utf-8")):
        named = re.match(r"((?:`[A-Z][A-Za-z]+`(?:, )?)+): `", term)
        for key in re.findall(r"`([A-Za-z]+)`", named.group(1)) if named else []:
            if key not in by_legacy:
                problems.append(f"docs/troubleshooting.md: `{key}` is no SourceOptions key")
    pairs = 0
    for page in (*sorted(DOCS.glob("*.md")), ROOT / "README.md"):
        text = page.read_text(encoding="utf-8")
        for legacy, snake in re.findall(r"`([A-Z][A-Za-z]+)` (?:/ |\()`([a-z_]+)`", text):  # `A` / `a`, `A` (`a`)
            if legacy in by_legacy:
                pairs += 1
                if by_legacy[legacy].snake != snake:
                    problems.append(f"{page.name}: `{legacy}` is `{by_legacy[legacy].snake}` in clpipe 1.9, not `{snake}`")
    assert not problems, "\n".join(problems)
    assert defaults_checked >= 8 and pairs >= 40, (defaults_checked, pairs)


def test_the_flags_that_override_a_key_say_which_and_name_only_declared_keys():
    from clpipe.config.options import QUERY_OPTIONS, SOURCE_OPTIONS, TOP_KEYS

    keys = {o.legacy for o in SOURCE_OPTIONS} | {f"Query.{o.legacy}" for o in QUERY_OPTIONS} | {legacy for legacy, _ in TOP_KEYS.values()}
    options = [
        (path, p)
        for path, command in visible_commands(cli)
        if path.startswith("clpipe dicom ")
        for p in command.params
        if isinstance(p, click.Option) and not p.hidden
    ]
    problems = []
    for path, option in options:
        for key in re.findall(r"overrides ([A-Za-z.]+)", option.help or ""):
            if key not in keys:
                problems.append(f"{path} {option.opts[0]}: overrides {key}, which is no config key")
    for declared in (o for o in (*SOURCE_OPTIONS, *QUERY_OPTIONS) if o.flag):
        key = declared.legacy if declared in SOURCE_OPTIONS else f"Query.{declared.legacy}"
        flags = [(path, o) for path, o in options if declared.flag in o.opts]
        if not flags:
            problems.append(f"{declared.flag} ({key}) is on no command")
        problems += [
            f"{path} {declared.flag}: its help does not say it overrides {key}"
            for path, o in flags
            if f"overrides {key})" not in (o.help or "") and f"overrides {key}." not in (o.help or "")
        ]
    assert not problems, "\n".join(problems)
