"""The ``clpipe`` command: click commands that parse, call the core, and render.

Options follow clpipe's single-dash style (``-config_file``, ``-c``), with the
``--config-file`` style accepted as an alias.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import click

from .. import __version__
from ..config.options import ENGINES, flag_help
from ..errors import ClpipeError, ConfigError, DiskFull, EndsHere, Terminated, is_disk_full
from .modulefile import modulefile_cli
from .options import STATE, SUBMIT_HELP, config_file_option, debug_option


@click.group(context_settings={"help_option_names": ["-h", "--help", "-help"]})
@click.version_option(__version__, "-version", "--version", prog_name="clpipe")
def cli() -> None:
    """clpipe: the MRI pipeline's DICOM sync step."""


@cli.group("dicom")
def dicom() -> None:
    """Get DICOM data onto the cluster."""


def _find_config(config_file: str | None) -> str:
    if config_file:
        return config_file
    default = Path("clpipe_config.json")
    if default.exists():
        return str(default)
    raise ConfigError("no config file given and no clpipe_config.json here; pass -config_file PATH")


_BATCH_HELP = 'Batch configuration: a built-in profile (e.g. slurmUNCConfig.json), a file, or "" to run here (overrides BatchConfig).'
_AFTER_HELP = "Start the sync only after this batch job has completed successfully."


SOURCE_FLAGS_META = "clpipe.source_flags"


def _keep_source_flag(ctx: click.Context, param: click.Parameter, value: object) -> object:
    """The callback of a SourceOptions flag: its value, when given, kept in the command's
    context for load_project_config (:func:`_source_flags`)."""
    if value is not None:
        ctx.meta.setdefault(SOURCE_FLAGS_META, {})[param.name] = value
    return value


def _source_flags() -> dict:
    """The SourceOptions flags given (-stable_after, :func:`_run_options`, :func:`_stop_options`)."""
    return dict(click.get_current_context().meta.get(SOURCE_FLAGS_META, {}))


def _stable_after_option(func):
    """-stable_after (the sync commands and status): a SourceOptions flag (:func:`_source_flags`)."""
    return click.option(
        "-stable_after",
        "--stable-after",
        "stable_after",
        metavar="DURATION",
        help=flag_help("stable_after"),
        callback=_keep_source_flag,
        expose_value=False,
    )(func)


def _common_options(func):
    for option in reversed(
        [
            config_file_option,
            click.option("-dropoff_dir", "--dropoff-dir", "dropoff_dir", help=flag_help("dropoff_directory")),
            click.option("-temp_dir", "--temp-dir", "temp_dir", help=flag_help("temp_directory")),
            _stable_after_option,
            click.option("-batch_config", "--batch-config", "batch_config", help=_BATCH_HELP),
            click.option("-after", "--after", "after", metavar="JOBID", help=_AFTER_HELP),
            click.option("-submit", "-s", "--submit", "submit", is_flag=True, help=SUBMIT_HELP),
        ]
    ):
        func = option(func)
    return func


def _run_options(func):
    """-shards and -every (clpipe/arrays.py, clpipe/schedule.py): SourceOptions flags, kept
    in the command's context for load_project_config (:func:`_source_flags`)."""
    for option in (
        click.option(
            "-every", "--every", "every", metavar="DURATION", help=flag_help("every"), callback=_keep_source_flag, expose_value=False
        ),
        click.option(
            "-shards",
            "--shards",
            "shards",
            type=click.IntRange(min=0),
            metavar="N",
            help=flag_help("shards"),
            callback=_keep_source_flag,
            expose_value=False,
        ),
    ):
        func = option(func)
    return func


def _stop_options(func):
    """-max_duration and -continue/-no_continue (sync/stopping.py, clpipe/continuation.py):
    SourceOptions flags, kept with those of :func:`_run_options` (:func:`_source_flags`)."""
    for option in (
        click.option(
            "-max_duration",
            "--max-duration",
            "max_duration",
            metavar="DURATION",
            help=flag_help("max_duration"),
            callback=_keep_source_flag,
            expose_value=False,
        ),
        click.option(
            "-continue/-no_continue",
            "--continue/--no-continue",
            "continue_job",
            default=None,
            help=flag_help("continue_job"),
            callback=_keep_source_flag,
            expose_value=False,
        ),
    ):
        func = option(func)
    return func


@dicom.command("flywheel_sync")
@click.option(
    "-source_url",
    "--source-url",
    "source_url",
    help=flag_help("source_url", "Flywheel project to sync, fw://<group>/<project>/ (overrides {key}). `fw ls` browses projects."),
)
@click.option("-engine", "--engine", "engine", type=click.Choice(ENGINES), help=flag_help("engine"))
@_common_options
@_run_options
@_stop_options
@debug_option
def flywheel_sync_cli(config_file, source_url, dropoff_dir, temp_dir, engine, batch_config, after, submit) -> int:
    """Sync DICOM data from a Flywheel project into the dropoff folder.

    Reads SourceOptions from the config file. Log in with `fw login` first. Logs and the
    audit CSV go to <project>/logs/sync_logs.
    """
    config = _sync_config(config_file, source_url, dropoff_dir, temp_dir, engine=engine)
    if not config.source.is_flywheel:
        raise ConfigError(
            f"{config.key('source_url')} is {config.source.url}: "
            "flywheel_sync syncs Flywheel projects (fw://group/project/); "
            "use `clpipe dicom sync` for DICOMweb, DIMSE and file:// sources"
        )
    return _sync_job(config, batch_config, after, submit)


@dicom.command("sync")
@click.option(
    "-source_url",
    "--source-url",
    "source_url",
    help=flag_help(
        "source_url",
        "What to sync (overrides {key}): fw://group/project/, dicomweb+http(s)://host:port/path, "
        "dimse://CALLED_AET@host:port or file:///folder.",
    ),
)
@click.option("-patient_id", "--patient-id", "patient_id", help=flag_help("patient_id"))
@click.option("-patient_name", "--patient-name", "patient_name", help=flag_help("patient_name"))
@click.option("-study_date", "--study-date", "study_date", help=flag_help("study_date"))
@click.option("-modality", "--modality", "modality", help=flag_help("modality"))
@click.option("-series_description", "--series-description", "series_description", help=flag_help("series_description"))
@click.option("-accession_number", "--accession-number", "accession_number", help=flag_help("accession_number"))
@click.option(
    "-limit",
    "--limit",
    "limit",
    type=click.IntRange(min=0),
    help=flag_help("limit", "At most this many studies (0: all; overrides {key})."),
)
@_common_options
@_run_options
@_stop_options
@debug_option
def dicom_sync_cli(
    config_file,
    source_url,
    patient_id,
    patient_name,
    study_date,
    modality,
    series_description,
    accession_number,
    limit,
    dropoff_dir,
    temp_dir,
    batch_config,
    after,
    submit,
) -> int:
    """Sync DICOM data from any source into the dropoff folder: a Flywheel project, a
    DICOMweb server, a PACS over DIMSE, or a mounted folder.

    Reads SourceOptions (and its Query block) from the config file; flags override it.
    Every instance lands once, as <SOPInstanceUID>.dcm, in one folder per subject, session
    and series. Logs, the audit CSV and a JSON summary go to <project>/logs/sync_logs.
    """
    query = {
        "patient_id": patient_id,
        "patient_name": patient_name,
        "study_date": study_date,
        "modality": modality,
        "series_description": series_description,
        "accession_number": accession_number,
        "limit": limit,
    }
    config = _sync_config(config_file, source_url, dropoff_dir, temp_dir, query=query)
    if config.source.is_flywheel and any(v is not None for v in query.values()):
        raise ConfigError(
            "the query flags (-patient_id, -study_date, ...) are for DICOM sources; filter a Flywheel "
            "project with CommandLineOpts (e.g. --include-container-tags)"
        )
    return _sync_job(config, batch_config, after, submit)


def _sync_config(config_file, source_url, dropoff_dir, temp_dir, **more):
    """The project config a sync command runs: the file, with the options given over it."""
    from ..config import load_project_config

    return load_project_config(
        _find_config(config_file), source_url=source_url, dropoff_dir=dropoff_dir, temp_dir=temp_dir, flags=_source_flags(), **more
    )


def _sync_job(config, batch_config, after, submit) -> int:
    """Plan the sync job, then print it, run it here, or submit it."""
    from ..submit import describe, launch, prepare

    job = prepare(config, batch_config, after, submit, debug=STATE["debug"])
    if not submit:
        for line in describe(job):
            click.echo(line)
        return 0
    return launch(job, click.echo)


@dicom.command("status")
@config_file_option
@click.option("-json", "--json", "as_json", is_flag=True, help="Print the status as one JSON object (see docs/status.schema.json).")
@click.option(
    "-html", "--html", "html_file", type=click.Path(dir_okay=False), metavar="FILE", help="Also write it as one self-contained HTML page."
)
@click.option(
    "-refresh", "--refresh", "refresh", is_flag=True, help="List the source once (no download) to show new, changed and removed sessions."
)
@click.option(
    "-ready",
    "--ready",
    "ready",
    is_flag=True,
    help="Print only the sessions ready for BIDS conversion (complete, stable, not converted): subject<TAB>session<TAB>path.",
)
@_stable_after_option
@debug_option
def status_cli(config_file, as_json, html_file, refresh, ready) -> int:
    """Show the state of every session in the dropoff: complete, arriving, partial, new,
    removed or converted, with the last sync and the history of the runs.

    Reads only local files (the sessions file the syncs keep, the BIDS folders, the run
    summaries in logs/sync_logs) unless -refresh. Exits 0 whenever the state could be read.
    """
    from ..config import load_project_config
    from ..status import last_sync_line, no_sync_line, read_status, table

    if as_json and ready:
        raise ConfigError("-json and -ready are two different outputs; give one of them")
    found = _find_config(config_file)
    config = load_project_config(found, flags=_source_flags())
    status = read_status(config, refresh=refresh)
    machine = as_json or ready  # stdout is for a program: messages go to stderr
    if html_file:
        from ..status.page import write

        try:
            write(status, Path(html_file))
        except OSError as exc:
            if is_disk_full(exc):
                raise
            raise ConfigError(
                f"-html {html_file}: cannot be written ({exc.strerror or exc}); name a file in a folder you can write"
            ) from None
        click.echo(f"wrote {Path(html_file).absolute()}", err=machine)
    if not status.synced and not status.refreshed:
        click.echo(no_sync_line(status, found), err=machine)
    if as_json:
        click.echo(status.to_json())
    elif ready:
        ready_lines = status.ready()
        if ready_lines:
            click.echo("\n".join(ready_lines))
    elif status.synced or status.refreshed:
        lines = [table(status, colour=sys.stdout.isatty() and "NO_COLOR" not in os.environ), last_sync_line(status)]
        if status.refreshed:
            lines.append("source listed just now: " + ", ".join(f"{n} {what}" for what, n in status.changes.items()) + " sessions")
        click.echo("\n".join(lines))
    return 0


@cli.command("_run_plan", hidden=True)
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@debug_option
def run_plan_cli(plan_file) -> int:
    """Run a sync plan on this node (what a batch job executes)."""
    from ..runner import run_plan_file

    return run_plan_file(plan_file)


@cli.command("_merge_shards", hidden=True)
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@debug_option
def merge_shards_cli(plan_file) -> int:
    """The final job of a sharded sync (-shards): merge the shards, report, fail if one failed."""
    from ..runner import merge_plan_file

    return merge_plan_file(plan_file)


@dicom.command("unschedule")
@config_file_option
@debug_option
def unschedule_cli(config_file) -> int:
    """Stop a sync scheduled with -every: cancel its pending next run (recorded in
    logs/sync_logs/schedule.json) for the config's dropoff."""
    from ..config import load_project_config
    from ..schedule import unschedule

    return unschedule(load_project_config(_find_config(config_file)), click.echo)


@cli.command("project_setup")
@click.option("-project_title", "--project-title", "project_title", required=True, help="The project's name.")
@click.option(
    "-project_dir", "--project-dir", "project_dir", required=True, type=click.Path(file_okay=False), help="Where to create the project."
)
@click.option("-source_url", "--source-url", "source_url", help="The Flywheel project to sync from, fw://<group>/<project>/.")
@click.option(
    "-profile",
    "--profile",
    "profile",
    default="local",
    show_default=True,
    help="Batch configuration to start from: local (no batch system) or a built-in profile such as slurmUNCConfig.json.",
)
@debug_option
def project_setup_cli(project_title, project_dir, source_url, profile) -> int:
    """Create a clpipe project: clpipe_config.json, data_DICOMs/, logs/sync_logs/, ..."""
    from ..project_setup import setup_project

    path = setup_project(project_title, project_dir, source_url, profile)
    click.echo(f"Created project {project_title!r}: {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line and a non-zero exit code for every user error."""
    from ..batch.local import JOB_LOG, finish_job, start_job_log

    STATE["debug"] = False
    if os.environ.get(JOB_LOG):  # a job run here by run_local: its output goes to its log too
        start_job_log()
    code, error = _main(argv)
    code = finish_job(code, error)  # and a log that could not be written whole is said
    _exit_now_if_abandoned(code)
    sys.exit(code)


def _exit_now_if_abandoned(code: int) -> None:
    """A run stopped before its end may have left transfers running in their threads (a
    read that does not return; sync/stopping.py): everything is saved, so the process ends
    now rather than wait for them."""
    from ..sync.stopping import current

    request = current()
    if request is not None and request.abandoned:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _main(argv: list[str] | None) -> tuple[int, BaseException | None]:
    """Run the command; its exit status, and the error it ended with."""
    try:
        result = cli.main(args=argv, prog_name="clpipe", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("clpipe: aborted", err=True)
        return 130, None
    except click.UsageError as exc:  # one line, as every other error: what is wrong and where help is
        where = exc.ctx.command_path if exc.ctx is not None else "clpipe"
        message = exc.format_message()
        if exc.ctx is not None:  # a misspelt option is the likeliest cause of any usage error
            message = _unknown_option(exc.ctx, sys.argv[1:] if argv is None else argv) or message
        click.echo(f"clpipe: error: {message} (see `{where} -help`)", err=True)
        return exc.exit_code, exc
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code, exc
    except ClpipeError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        click.echo(f"clpipe: error: {exc}", err=True)
        return exc.exit_code, exc
    except KeyboardInterrupt:
        click.echo("clpipe: interrupted", err=True)
        return 130, None
    except Terminated as exc:
        if STATE["debug"]:
            traceback.print_exc()
        click.echo(f"clpipe: error: {exc}", err=True)
        return exc.exit_code, None
    except EndsHere as exc:  # requeued at its time limit, or cancelled (clpipe/continuation.py): said already
        return exc.exit_code, None
    except OSError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        if not is_disk_full(exc):
            return _internal_error(exc), exc
        # a full disk where no step said more (a plan, a script, a record of the job): the folder
        named = exc.filename2 or exc.filename
        folder = Path(os.fsdecode(named)).parent if isinstance(named, (str, bytes)) and named else Path.cwd()
        full = DiskFull.at(exc, [(folder, "")])
        click.echo(f"clpipe: error: {full}", err=True)
        return full.exit_code, full
    except Exception as exc:  # a bug: say so plainly
        if STATE["debug"]:
            traceback.print_exc()
        return _internal_error(exc), exc
    return (result if isinstance(result, int) else 0), None


def _unknown_option(ctx: click.Context, argv: list[str]) -> str:
    """The option the user typed that the command does not have, with the nearest real one.
    (click reports a word such as ``-sourceurl`` by one of its letters, ``-o``, since
    single-dash words can be short options grouped together.)"""
    import difflib

    options = {name: param for param in ctx.command.params if isinstance(param, click.Option) for name in param.opts}
    takes_value = False
    for token in argv:
        if takes_value:  # the value of the option before it, whatever it looks like
            takes_value = False
            continue
        word = token.split("=", 1)[0]
        if word in options:
            takes_value = not options[word].is_flag and "=" not in token
            continue
        if word.startswith("-") and len(word) > 1 and " " not in word and not word.lstrip("-").replace(".", "").isdigit():
            near = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
            return f"no such option: {word}" + (f"; did you mean {near[0]}?" if near else "")
    return ""


def _internal_error(exc: BaseException) -> int:
    click.echo(f"clpipe: internal error: {exc.__class__.__name__}: {exc} (rerun with -debug for the traceback)", err=True)
    return 1


cli.add_command(modulefile_cli)
