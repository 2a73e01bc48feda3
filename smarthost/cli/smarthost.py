"""`smarthost`: make a root (`init`) and run the daemon (`run`)."""

from __future__ import annotations

import asyncio
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


@cli.command()
@click.option("--root", "root_path", default=None, help="Root directory (default $SMARTHOST_ROOT or /var/qmail).")
@click.option("--timestamps", is_flag=True, help="Start each log line with the unix time.")
def run(root_path: str | None, timestamps: bool) -> None:
    """Run the scheduler (and, as they come, the listeners) until SIGTERM."""
    from smarthost.send import Log, Scheduler

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
        asyncio.run(Scheduler(root, log).run())
    except OSError as e:
        raise click.ClickException(f"alert: cannot start: {e}") from None


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
