"""The ``clpipe`` command: click commands that parse, call the core, and render.

Options follow clpipe's single-dash style (``-config_file``, ``-c``), with the
``--config-file`` style accepted as an alias.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import traceback
from pathlib import Path

import click

from .. import __version__
from ..errors import ClpipeError, ConfigError

_STATE = {"debug": False}

CONFIG_HELP = "The project's clpipe_config.json (or .yaml). Default: ./clpipe_config.json"
SUBMIT_HELP = "Run the job (submit it to the batch system, or run it here when there is none). Without it, only print the job."
DEBUG_HELP = "Show tracebacks and extra detail."


def _debug_option(func):
    def remember(ctx, param, value):
        if value:
            _STATE["debug"] = True
        return value

    return click.option("-debug", "-d", "--debug", "debug", is_flag=True, help=DEBUG_HELP,
                        callback=remember, expose_value=False, is_eager=True)(func)


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


@dicom.command("flywheel_sync")
@click.option("-config_file", "-c", "--config-file", "config_file", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("-source_url", "--source-url", "source_url", help="Flywheel project to sync, fw://<group>/<project>/ (overrides SourceURL). `fw ls` browses projects.")
@click.option("-dropoff_dir", "--dropoff-dir", "dropoff_dir", help="Where synced DICOMs go (overrides DropoffDirectory).")
@click.option("-temp_dir", "--temp-dir", "temp_dir", help="Where fw keeps temporary files (overrides TempDirectory).")
@click.option("-engine", "--engine", "engine", type=click.Choice(["fw-cli", "native"]),
              help="fw-cli: run the Flywheel CLI's fw sync (default); native: clpipe's own engine, no fw needed (overrides Engine).")
@click.option("-batch_config", "--batch-config", "batch_config", help="Batch configuration: a built-in profile (e.g. slurmUNCConfig.json), a file, or \"\" to run here (overrides BatchConfig).")
@click.option("-after", "--after", "after", metavar="JOBID", help="Start the sync only after this batch job has completed successfully.")
@click.option("-submit", "-s", "--submit", "submit", is_flag=True, help=SUBMIT_HELP)
@_debug_option
def flywheel_sync_cli(config_file, source_url, dropoff_dir, temp_dir, engine, batch_config, after, submit) -> int:
    """Sync DICOM data from a Flywheel project into the dropoff folder with `fw sync`.

    Reads SourceOptions from the config file. Log in with `fw login` first. Logs and the
    audit CSV go to <project>/logs/sync_logs.
    """
    from ..batch.config import load_batch_config
    from ..config import load_project_config
    from ..fwcli import make_plan

    config = load_project_config(_find_config(config_file), source_url=source_url, dropoff_dir=dropoff_dir, temp_dir=temp_dir, engine=engine)
    batch = load_batch_config(batch_config if batch_config is not None else config.batch_config, config.project_directory)
    plan = make_plan(config)
    logs = Path(plan.sync_logs)
    stem = f"{plan.job_name}-{plan.run_id}"
    plan_path = logs / f"{stem}.plan.json"
    job = plan.job((sys.executable, "-m", "clpipe", "_run_plan", str(plan_path)))
    if after is not None and batch is None:
        raise ConfigError("-after: waiting for another job needs a batch system; set BatchConfig or -batch_config")

    submission = None
    if batch is not None:
        from ..batch.scheduler import render

        submission = render(job, batch, config.email_address, logs / f"{stem}.sh", after=after)

    if not submit:
        where = "here, with no batch system" if batch is None else f"as a {batch.scheduler} batch job ({batch.name})"
        click.echo(f"Job:       {job.name}, would run {where}")
        click.echo(f"Source:    {plan.source_url}")
        click.echo(f"Dropoff:   {plan.dropoff}")
        click.echo(f"Temp:      {plan.temp_dir}")
        click.echo(f"Resources: {job.resources.describe()}")
        click.echo(f"Log:       {job.log_path if submission is None else logs / submission.output_pattern}")
        click.echo(f"Audit log: {plan.audit_csv}")
        if plan.engine == "native":
            click.echo(f"Engine:    native (clpipe's own; no fw needed), {plan.sync_options.jobs} parallel downloads")
            click.echo(f"Summary:   {plan.summary_json}")
            if plan.layout_template:
                from ..sync.layout import dicom_format_string

                click.echo(f"Layout:    {plan.layout_template} (DICOMFormatString {dicom_format_string(plan.layout_template)!r})")
        else:
            click.echo(f"Command:   {shlex.join(plan.fw_argv)}")
        if submission is not None:
            click.echo(f"Script:    {submission.script_path}")
            click.echo(f"Submit:    {submission.command_line()}")
            click.echo("--- script ---")
            click.echo(submission.script.rstrip("\n"))
            click.echo("--------------")
        if plan.engine == "fw-cli" and shutil.which("fw") is None:
            click.echo("Note:      `fw` is not on PATH here; install the Flywheel CLI before running (see the README).")
        click.echo("Nothing was run. Add -submit to run it.")
        return 0

    logs.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(plan.to_json())
    if plan.layout_template:
        from ..config.project import write_dicom_format_string
        from ..sync.layout import dicom_format_string

        done = write_dicom_format_string(config, dicom_format_string(plan.layout_template))
        if done:
            click.echo(f"Note:      {done}")
    if submission is None:
        from ..batch.local import run_local

        click.echo(f"Running {job.name} here; log: {job.log_path}")
        return run_local(job)

    from ..batch.scheduler import record_submission, submit as submit_job

    job_id = submit_job(submission)
    record = record_submission(submission, job, job_id, after, logs / f"{stem}.job.json")
    click.echo(f"Submitted batch job {job_id}")
    click.echo(f"Output:    {record['output']}")
    click.echo(f"Record:    {logs / f'{stem}.job.json'} (next step: {record['wait_for_it']})")
    return 0


@cli.command("_run_plan", hidden=True)
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False))
@_debug_option
def run_plan_cli(plan_file) -> int:
    """Run a sync plan on this node (what a batch job executes)."""
    import atexit

    from ..batch.local import wait_for_tee

    atexit.register(wait_for_tee)
    from ..fwcli import SyncPlan, run_plan

    plan = SyncPlan.from_json(Path(plan_file).read_text())
    if plan.engine == "native":
        from ..sync.run import run_native

        return run_native(plan)
    return run_plan(plan)


@cli.command("project_setup")
@click.option("-project_title", "--project-title", "project_title", required=True, help="The project's name.")
@click.option("-project_dir", "--project-dir", "project_dir", required=True, type=click.Path(file_okay=False), help="Where to create the project.")
@click.option("-source_url", "--source-url", "source_url", help="The Flywheel project to sync from, fw://<group>/<project>/.")
@click.option("-profile", "--profile", "profile", default="local", show_default=True,
              help="Batch configuration to start from: local (no batch system) or a built-in profile such as slurmUNCConfig.json.")
@_debug_option
def project_setup_cli(project_title, project_dir, source_url, profile) -> int:
    """Create a clpipe project: clpipe_config.json, data_DICOMs/, logs/sync_logs/, ..."""
    from ..project_setup import setup_project

    path = setup_project(project_title, project_dir, source_url, profile)
    click.echo(f"Created project {project_title!r}: {path}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line and a non-zero exit code for every user error."""
    _STATE["debug"] = False
    try:
        result = cli.main(args=argv, prog_name="clpipe", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("clpipe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ClpipeError as exc:
        if _STATE["debug"]:
            traceback.print_exc()
        click.echo(f"clpipe: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("clpipe: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so plainly
        if _STATE["debug"]:
            traceback.print_exc()
        click.echo(f"clpipe: internal error: {exc.__class__.__name__}: {exc} (rerun with -debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


from .modulefile import modulefile_cli  # noqa: E402  (registered last: it uses _debug_option)
cli.add_command(modulefile_cli)
