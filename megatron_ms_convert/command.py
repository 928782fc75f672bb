"""What the two command-line tools share around their own planning: the flags' help format, the log,
the order of a run (options -> --check or lock -> prepare -> run -> report) with its exit codes, the
progress bar, the `successfully` lines and the summary. Each direction supplies its own options,
planning and per-rank work; a failure anywhere before the run is one ERROR line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import ConvertInputError
from .folder_lock import folder_lock
from .manifest import rank_status
from .progress import PHASE_LABELS, ByteProgress, progress_line
from .runner import RankResult, RunSettings, RunStopped, Task, run_tasks, signals_stop_the_run
from .shard import Shard, lock_name, log_check

log = logging.getLogger(__name__)
# Every module logs under its own name (megatron_ms_convert.pt2ckpt, .ckpt2pt, .command, .runner); the
# one handler sits on the package's logger, so a run's lines, from either direction, go to one place.
package_log = logging.getLogger(__package__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2  # and 130 / 143 for Ctrl-C / SIGTERM (RunStopped)


# ---------------------------------------------------------------------------------------------
# Flags: the checks both tools make


def check_minimum(ns: argparse.Namespace, flags: Sequence[str], minimum: int) -> None:
    """Each of these flags (dest names), when given, is at least `minimum` (1: a size or count, 0: an
    iteration or sample count)."""
    for flag in flags:
        value = getattr(ns, flag, None)
        if value is not None and value < minimum:
            name = "--" + flag.replace("_", "-")
            raise ConvertInputError(f"{name} {value}",
                                    expected="a whole number >= 1" if minimum == 1 else f"a number >= {minimum}",
                                    fix=f"pass {name} {minimum} or more")


def check_against_saved(flags: dict[str, tuple[Any, Any]], where: Any, fix_also: str = "") -> None:
    """Each flag given (`flag: (given, saved)`) must equal the training run's value saved in `where`,
    when that value is known."""
    for flag, (given, saved) in flags.items():
        if given is not None and saved is not None and given != saved:
            raise ConvertInputError(f"{flag} {given} contradicts {where}",
                                    expected=f"{flag} {saved} (the training run's value)", found=str(given),
                                    fix=f"pass {flag} {saved}{fix_also}")


def reading_inputs(prepare: Callable[[Any], Any], options: Any, flags: str) -> Any:
    """`prepare(options)`, with a failure to read an input (permissions, an I/O error) reported as bad
    input naming the file, and the flags (`flags`) that point at the inputs."""
    try:
        return prepare(options)
    except OSError as err:
        raise ConvertInputError(f"cannot read {err.filename or 'an input file'}: {err.strerror or err}",
                                fix=f"check {flags}, their permissions and the disk") from None


def print_plans(plans: Sequence[Any]) -> int:
    """--dry-run: every plan as text, on stdout."""
    for plan in plans:
        print(plan.describe(), flush=True)
    return EXIT_OK


def run_settings(options: Any) -> RunSettings:
    """The flags that shape how the plans run, from either tool's options."""
    return RunSettings(verify=options.verify, debug=options.debug, multiprocess_off=options.multiprocess_off,
                       process_limit=options.process_limit, process_timeout=options.process_timeout)


def check_plans(plans: Sequence[Any]) -> int:
    """--check: the state of every output folder of the whole conversion, from the manifests; nothing
    written. Each plan names its ends with `ends()` (source, target)."""
    statuses = {plan.folder: rank_status(plan) for plan in plans}
    complete = log_check(plans, statuses, lambda plan: plan.ends(), log)
    return EXIT_OK if complete else EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# A run


def configure_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    package_log.handlers[:] = [handler]
    package_log.setLevel(logging.DEBUG if debug else logging.INFO)
    package_log.propagate = False


def run_command(ns: argparse.Namespace, *, options_of: Callable[[argparse.Namespace], Any],
                describe: Callable[[Any], tuple[Any, Any]], output_flag: str, output_of: Callable[[Any], Any],
                prepare: Callable[[Any], Any], prepare_outputs: Callable[[Any, Any], tuple[Any, dict]],
                run_and_report: Callable[[Any, dict, Any, float], int], verify_needs: str | None = None) -> int:
    """A whole run: options, then --check or --dry-run (the whole conversion's plans, `prepare`;
    nothing written), or: the output folder and what --verify needs checked, planning (`prepare`,
    which reads and writes nothing), and only then the output folder created and locked (until the
    run ends, however it ends; a shard locks only its own share), the outputs looked at
    (`prepare_outputs`) and the run. Returns the exit code; bad input found before the run is one
    ERROR line and EXIT_BAD_INPUT, and leaves nothing behind."""
    configure_logging(ns.debug)
    started = time.monotonic()
    with signals_stop_the_run(), contextlib.ExitStack() as held:
        try:
            options = options_of(ns)
            if options.check:
                return check_plans(prepare(options).plans)
            if options.dry_run:
                return print_plans(prepare(options).plans)
            check_output_folder(output_of(options), output_flag)
            if options.verify and verify_needs:
                check_importable(verify_needs, "--verify")
            log.info("converting %s -> %s", *describe(options))
            job = prepare(options)
            held.enter_context(folder_lock(output_of(options), lock_name(options.shard), flag=output_flag))
            job, statuses = prepare_outputs(options, job)
        except ConvertInputError as err:
            log.error("%s", err)
            return EXIT_BAD_INPUT
        except OSError as err:
            log.error("cannot write under %s %s: %s -> check the path, its permissions and free space",
                      output_flag, getattr(ns, output_flag[2:].replace("-", "_")), err)
            return EXIT_BAD_INPUT
        except RunStopped as stop:
            log.error("interrupted (%s) before any rank was converted; re-run the same command to convert them",
                      stop.cause)
            return stop.exit_code
        return run_and_report(job, statuses, options, started)


def check_output_folder(folder: Path, flag: str) -> None:
    """The output folder, or where it is to be created: a folder, or missing below a folder. (Checked
    before anything is created, so that a refused run leaves no trace.)"""
    for path in (folder, *folder.parents):
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            what = "it is a file, not a folder" if path == folder else f"{path} is a file, not a folder"
            raise ConvertInputError(f"{flag} {folder}: {what}", expected="a folder (created if missing)",
                                    fix=f"choose another {flag}, or move the file away")


def check_importable(module: str, flag: str) -> None:
    """`module` can be imported (looked up, not imported: importing MindSpore costs seconds)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConvertInputError(f"{flag} needs {module}, which is not installed in this Python "
                                f"({sys.executable})",
                                fix="pip install .[verify] (or pip install -r requirements.txt), "
                                    f"or run without {flag}")


def run_plans(plans: Sequence[Any], statuses: dict, settings: RunSettings, *, execute: Callable,
              where: Callable[[Any], Any], work: Callable[[Any], int]) -> tuple[list[RankResult], int | None]:
    """Convert the plans not done yet (with --verify, verify the done ones), reporting each as it
    ends and the bytes done as the workers go (`work(plan)`: the bytes a plan handles in each phase);
    returns the results and, when a signal stopped the run, its exit code."""
    if settings.debug:
        for plan in plans:
            log.debug("%s", plan.describe())
    results: list[RankResult] = []
    tasks = []
    for plan in plans:
        if statuses[plan.folder] == "outdated":
            log.info("'%s': its outputs were written by another version of the converter (this is %s); "
                     "converting it again", where(plan), __version__)
        if statuses[plan.folder] != "done":
            tasks.append(Task(plan, write=True))
        elif settings.verify:  # a complete output from an earlier run is verified, not rewritten
            tasks.append(Task(plan, write=False))
    progress = expected_progress(tasks, settings.verify, work)
    with progress_shown(progress) as show:
        def on_done(plan, result: RankResult) -> None:
            results.append(result)
            show(progress.finish(plan.folder))
            report_line(plan, result)

        def on_progress(plan, phase: str, done: int) -> None:
            show({phase: progress.update(plan.folder, phase, done)})

        for plan in plans:
            if statuses[plan.folder] == "done" and not settings.verify:
                on_done(plan, RankResult(plan.folder.name, "skipped"))
        try:
            run_tasks(tasks, settings, on_done, execute=execute, on_progress=on_progress)
        except RunStopped as stop:
            log.error("interrupted (%s): stopped the workers and removed their partial files; "
                      "re-run the same command to finish the remaining ranks", stop.cause)
            return results, stop.exit_code
    return results, None


def expected_progress(tasks: Sequence[Task], verify: bool, work: Callable[[Any], int]) -> ByteProgress:
    """The bytes each task handles: `work(plan)` written (unless it only verifies), and verified with --verify."""
    progress = ByteProgress()
    for task in tasks:
        nbytes = work(task.plan)
        if task.write:
            progress.expect(task.plan.folder, "write", nbytes)
        if verify:
            progress.expect(task.plan.folder, "verify", nbytes)
    return progress


def report_line(plan: Any, result: RankResult) -> None:
    """The line users grep: `successfully` once per folder whose files are complete."""
    source, target = plan.ends()
    if result.status == "failed":
        log.error("failed to convert '%s': %s", source, result.message)
    elif result.status == "skipped":
        log.info("convert '%s' to '%s' successfully (complete from an earlier run of this command; skipped).",
                 source, target)
    else:
        log.info("convert '%s' to '%s' successfully.", source, target)


def log_verified(results: Sequence[RankResult]) -> None:
    log.info("verified %d tensors in %d files", sum(r.verified_tensors for r in results),
             sum(r.verified_files for r in results))


LOG_PROGRESS_EVERY_S = 60.0


@contextlib.contextmanager
def progress_shown(progress: ByteProgress):
    """Yields `show(grown)`, to call with by how much each phase grew. On a terminal (stderr): one tqdm
    bar per phase over the bytes of the whole run (GB done / total, GB/s, ETA), the log lines printed
    above them. Otherwise (a log file stays greppable): a `progress:` line at most once a minute."""
    if not sys.stderr.isatty():
        started = last = time.monotonic()

        def log_now_and_then(grown: dict[str, int]) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= LOG_PROGRESS_EVERY_S:
                last = now
                log.info("%s", progress_line(progress, now - started))
        yield log_now_and_then
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with contextlib.ExitStack() as stack:
        # every report is drawn (mininterval 0): the workers already send at most one per 64 MiB or 0.5 s,
        # and tqdm's own 0.1 s throttle would drop the reports that a busy parent reads in one go
        bars = {phase: stack.enter_context(tqdm(total=progress.total(phase), desc=PHASE_LABELS[phase], position=index,
                                                unit="B", unit_scale=True, dynamic_ncols=True, smoothing=0.1,
                                                mininterval=0, miniters=1))
                for index, phase in enumerate(progress.phases())}
        stack.enter_context(logging_redirect_tqdm(loggers=[package_log]))

        def move_bars(grown: dict[str, int]) -> None:
            for phase, nbytes in grown.items():
                if nbytes and phase in bars:
                    bars[phase].update(nbytes)
        yield move_bars


def summary(results: Sequence[RankResult], total: int, started: float, shard: Shard | None = None) -> None:
    by = {s: sum(1 for r in results if r.status == s) for s in ("converted", "skipped", "failed")}
    log.info("summary%s: %d converted, %d skipped, %d failed, %d not run of %d folders in %.1f s, %d bytes written",
             f" (shard {shard})" if shard is not None else "",
             by["converted"], by["skipped"], by["failed"], total - len(results), total,
             time.monotonic() - started, sum(r.bytes_written for r in results))


def exit_code(results: Sequence[RankResult]) -> int:
    return EXIT_OK if all(r.status != "failed" for r in results) else EXIT_FAILED
