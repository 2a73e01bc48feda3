"""`smarthost`: make a root (`init`), run the daemon (`run`), edit who may use QMQP (`rules`)."""

from __future__ import annotations

import fcntl
import os
import sys

import click

from smarthost.root import Root, default_root


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The QMQP smart host: durable queue, scheduler, local delivery."""


@cli.command()
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--me", help="This host's name for control/me (default: the FQDN).")
def init(root: str, me: str | None) -> None:
    """Create a user-mode root directory ROOT (never overwrites existing files)."""
    from smarthost.init import init as do_init

    r = do_init(root, me)
    click.echo(f"smarthost: made {r.path}")
    click.echo(f"  local mail for example@{r.control.line('me')} goes to {r.sub('home', 'example', 'Maildir')}/")
    click.echo(f"  run it: SMARTHOST_ROOT={r.path} smarthost run")


root_option = click.option("--root", "root_path", default=None,
                           help="Root directory (default $SMARTHOST_ROOT or /var/qmail).")


def _listen(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, int]]:
    from smarthost.daemon import parse_listen

    try:
        return [parse_listen(v) for v in values]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@root_option
@click.option("--timestamps", is_flag=True, help="Start each log line with the unix time.")
@click.option("--qmqp", "qmqp", multiple=True, metavar="ADDR:PORT", callback=_listen,
              help="Listen for QMQP there ([::1]:PORT for IPv6; port 0 picks one). Repeatable.")
@click.option("--qmqp-workers", "workers", type=click.IntRange(1, 64), default=None,
              help="Processes accepting QMQP besides the scheduler's (default: one per core, at most 4).")
def run(root_path: str | None, timestamps: bool, qmqp: list[tuple[str, int]], workers: int | None) -> None:
    """Run the scheduler and the QMQP listeners until SIGTERM."""
    from smarthost.daemon import run as run_daemon
    from smarthost.logfmt import Log

    root = Root(os.path.abspath(root_path or default_root()))
    if not os.path.isdir(root.queue_dir):
        raise click.ClickException(f"{root.queue_dir} is not a queue; make the root with: smarthost init {root.path}")
    if root.control.line("me") is None and root.control.line("locals") is None:
        raise click.ClickException(f"{root.control_dir}/me is missing; I do not know my own name")
    mutex = open(os.path.join(root.queue_dir, "lock", "sendmutex"), "a")
    try:
        fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise click.ClickException("alert: cannot start: qmail-send is already running for this root") from None
    os.environ["SMARTHOST_ROOT"] = root.path
    log = Log(sys.stdout, timestamps)
    try:
        run_daemon(root, log, qmqp, workers)
    except OSError as e:
        raise click.ClickException(f"alert: cannot start: {e}") from None


@cli.group()
def rules() -> None:
    """Who may use QMQP: edit ROOT/rules/qmqp.rules (tcprules syntax) and compile qmqp.cdb."""


def _rules_paths(root_path: str | None) -> tuple[str, str]:
    root = Root(os.path.abspath(root_path or default_root()))
    if not os.path.isdir(root.rules_dir):
        raise click.ClickException(f"{root.rules_dir} is missing; make the root with: smarthost init {root.path}")
    return os.path.join(root.rules_dir, "qmqp.rules"), os.path.join(root.rules_dir, "qmqp.cdb")


def _set_rule(root_path: str | None, prefix: str, allow: bool, assignments: tuple[str, ...]) -> None:
    from smarthost import tcprules

    env = []
    for a in assignments:
        name, eq, value = a.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"{a!r} is not VAR=value", param_hint="VAR=value")
        env.append((name.encode(), value.encode("utf-8", "surrogateescape")))
    rules_path, cdb_path = _rules_paths(root_path)
    try:
        line = tcprules.update(rules_path, cdb_path, prefix.encode("utf-8", "surrogateescape"), allow, env)
    except tcprules.RulesSyntaxError as e:
        raise click.ClickException(f"{rules_path}: {e}; fix it first") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"unable to update {e.filename or rules_path}: {e.strerror or e}") from None
    click.echo(line.decode("utf-8", "surrogateescape"))


@rules.command()
@root_option
@click.argument("prefix")
@click.argument("assignments", nargs=-1, metavar="[VAR=value]...")
def allow(root_path: str | None, prefix: str, assignments: tuple[str, ...]) -> None:
    """Let PREFIX (1.2.3.4, 10.0.0., 1.2.3.1-20, ::1, 2001:db8:, "" for everyone else) use QMQP."""
    _set_rule(root_path, prefix, True, assignments)


@rules.command()
@root_option
@click.argument("prefix")
def deny(root_path: str | None, prefix: str) -> None:
    """Refuse PREFIX: its connections are closed unread."""
    _set_rule(root_path, prefix, False, ())


@rules.command(name="list")
@root_option
def list_rules(root_path: str | None) -> None:
    """Show the rules, first match wins."""
    from smarthost import tcprules

    rules_path, cdb_path = _rules_paths(root_path)
    text = tcprules.read_rules(rules_path)
    if text is None:
        if os.path.exists(cdb_path):
            click.echo(f"# {rules_path} is missing; {cdb_path} is in force")
        else:
            click.echo(f"# no {rules_path}: only 127.0.0.1 and ::1 may use QMQP")
        return
    for line in tcprules.split_lines(text):
        if line.strip():
            click.echo(line.rstrip(b"\n").decode("utf-8", "surrogateescape"))
    try:
        stale = os.stat(cdb_path).st_mtime < os.stat(rules_path).st_mtime
    except FileNotFoundError:
        stale = True
    if stale:
        click.echo(f"# warning: {cdb_path} is older than the rules; run: smarthost rules compile", err=True)


@rules.command(name="compile")
@root_option
def compile_rules(root_path: str | None) -> None:
    """Compile qmqp.rules into qmqp.cdb (after editing it by hand)."""
    from smarthost import tcprules

    rules_path, cdb_path = _rules_paths(root_path)
    try:
        n = tcprules.compile_file(rules_path, cdb_path)
    except tcprules.RulesSyntaxError as e:
        raise click.ClickException(f"{rules_path}: {e}") from None
    except OSError as e:
        raise click.ClickException(f"unable to compile {rules_path}: {e.strerror or e}") from None
    click.echo(f"smarthost: {cdb_path}: {n} keys")


@cli.command()
@click.option("--root", "root_path", default=None, help="Root for the demo (default: var/demo in the checkout).")
@click.option("--once", is_flag=True, help="Stop after showing the delivered message.")
def demo(root_path: str | None, once: bool) -> None:
    """Start a user-mode smart host, send one message through it and show it delivered."""
    from smarthost.demo import demo as do_demo

    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = root_path or os.path.join(checkout, "var", "demo")
    sys.exit(do_demo(path, once))


def main() -> None:
    cli(prog_name="smarthost")


if __name__ == "__main__":
    main()
