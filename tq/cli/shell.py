"""The admin shell's command layer: what a line typed over SSH (tq/cli/sshd.py) does.

A line is split with :mod:`shlex` and run through the ``tq`` typer app itself, in a worker thread,
with ``--broker`` pointing at this broker: every command is the CLI's own code (which talks to the
broker through the client), printed through the session's consoles (``output.redirect``). This
module only decides what may run:

- the admin commands (``ADMIN_COMMANDS``); servers, benchmarks and TUIs are not reachable;
- a read-only key runs no ``MUTATING`` command (refused with ``EXIT_REFUSED``);
- ``--broker`` cannot be overridden (the shell talks to this broker only);
- every mutating command, refused or run, is logged on ``tq.ssh`` with the key's comment.

It knows nothing of SSH: a session hands it a :class:`Terminal` (how to write, how wide).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import shlex
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from tq.cli import cancel, output
from tq.logfields import kv

log = logging.getLogger("tq.ssh")

GROUPS: dict[str, tuple[str, ...]] = {
    "dlq": ("list", "show", "retry", "purge"),
    "queue": ("pause", "resume"),
    "cluster": ("status", "add", "remove"),
}
"""Command groups the shell offers, with the subcommands it allows."""

ADMIN_COMMANDS: tuple[str, ...] = (
    "stats",
    "queues",
    "workers",
    "list",
    "status",
    "explain",
    "wait",
    "submit",
    "cancel",
    "retry",
    *GROUPS,
)
"""Top-level commands the shell runs, in the order ``help`` lists them."""

MUTATING: frozenset[tuple[str, ...]] = frozenset(
    {
        ("submit",),
        ("cancel",),
        ("retry",),
        ("dlq", "retry"),
        ("dlq", "purge"),
        ("queue", "pause"),
        ("queue", "resume"),
        ("cluster", "add"),
        ("cluster", "remove"),
    }
)
"""Commands that change the broker: admin keys only (even with ``--dry-run``)."""

EXIT_WORDS = frozenset({"exit", "quit", "logout"})
EXIT_USAGE = 2
EXIT_REFUSED = 77
EXIT_CANCELLED = 130  # as a shell reports a command stopped by Ctrl-C
"""Exit code of a command a read-only key may not run (``EX_NOPERM`` of sysexits.h)."""

MAX_RUNNING = 4
MAX_SHELL_WAIT_S = 60.0  # the longest wait the shell runs (see Shell._check)
WAIT_OPTIONS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("wait",): ("--timeout",),
    ("submit",): ("--wait-timeout",),
}
"""Commands that run at once, over all sessions; more wait for a free thread."""

EXEC_WIDTH = 100
"""Columns of a session without a terminal (``ssh host stats``): tables are laid out for this."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is on the other end: the authorized key they proved they hold."""

    user: str
    comment: str
    fingerprint: str
    admin: bool
    peer: str

    @property
    def role(self) -> str:
        return "admin" if self.admin else "read-only"


@dataclass(frozen=True, slots=True)
class Terminal:
    """A session's output, as the shell sees it. ``write_out`` / ``write_err`` must be called on
    the event loop's thread (the shell takes care of that); ``tty`` means a terminal (colors)."""

    write_out: Callable[[str], None]
    write_err: Callable[[str], None]
    width: int = EXEC_WIDTH
    tty: bool = False
    term_type: str = ""
    # Done when the session has gone: its running command is then cancelled (tq/cli/cancel.py).
    gone: asyncio.Future[Any] | None = None


class _LoopWriter:
    """A text file for rich and ``say``: writes on the loop's thread go straight out, writes from
    a command's worker thread are handed to the loop (in order, before the command's result)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[str], None]) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._write = write
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        if text:
            if threading.get_ident() == self._thread:
                self._write(text)
            else:
                self._loop.call_soon_threadsafe(self._write, text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _Refused(Exception):
    """A line the shell will not run: the message and the exit code."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Shell:
    """Runs shell lines for sessions; one per SSH server. ``broker_url`` is this broker's own
    TCP address (loopback); the commands reach it like any client, with ``TQ_TOKEN`` if set."""

    def __init__(self, broker_url: str, *, max_running: int = MAX_RUNNING) -> None:
        self.broker_url = broker_url
        self.max_running = max_running
        self._pool: ThreadPoolExecutor | None = None
        # Read-only keys share all threads but one: a command in a thread cannot be stopped
        # when its session goes, so four read-only `wait`s once held every thread and froze
        # the shell for admin keys too. (Created on first use, inside the event loop.)
        self._readonly_slots: asyncio.Semaphore | None = None
        self._running: set[cancel.CancelScope] = set()

    def close(self) -> None:
        """Stop taking commands, and cancel those running."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for running in list(self._running):
            if not running.cancelled:
                log.info("ssh.command_cancelled", extra=kv(reason="shell closed"))
                running.cancel()

    @cached_property
    def _root(self) -> Any:
        from tq.cli.main import app

        return typer.main.get_command(app)

    # --- running a line ------------------------------------------------------------------------

    async def run_line(self, line: str, who: Identity, term: Terminal) -> int:
        """Run one line; returns its exit code (0 for an empty line)."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            return self._refuse(term, f"cannot read the line: {exc}", EXIT_USAGE)
        return await self.run(argv, who, term)

    async def run(self, argv: list[str], who: Identity, term: Terminal) -> int:
        if not argv:
            return 0
        out, err = self._consoles(term)
        if argv[0] == "help":
            return self._help(argv[1:], who, out, err)
        try:
            path = self._path(argv)
        except _Refused as exc:
            return self._refuse(term, exc.message, exc.code)
        if "--help" in _options(argv):
            return self._help(list(path), who, out, err)
        try:
            self._check(argv, path, who)
        except _Refused as exc:
            if path in MUTATING:
                log.warning("ssh.refused", extra=kv(**_audit(who, argv), reason=exc.message))
            return self._refuse(term, exc.message, exc.code)
        full = [*path, "--broker", self.broker_url, *argv[len(path) :]]
        if who.admin:
            code = await self._in_thread(term, self._invoke, full, out, err)
        else:
            if self._readonly_slots is None:
                self._readonly_slots = asyncio.Semaphore(max(1, self.max_running - 1))
            async with self._readonly_slots:
                code = await self._in_thread(term, self._invoke, full, out, err)
        if path in MUTATING:
            log.info("ssh.command", extra=kv(**_audit(who, argv), exit=code))
        return code

    async def _in_thread(self, term: Terminal, fn: Callable[..., int], *args: Any) -> int:
        """``asyncio.to_thread`` on the shell's own threads: the context (and so the session's
        consoles) goes along, and a slow command never takes a thread the broker needs. The
        command is cancelled if the session goes first (or the shell closes)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_running, thread_name_prefix="tq-ssh")
        context = contextvars.copy_context()
        scope = cancel.CancelScope()
        self._running.add(scope)

        def in_scope() -> int:
            with cancel.scope(scope):
                return fn(*args)

        try:
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(self._pool, partial(context.run, in_scope))
            if term.gone is not None:
                await asyncio.wait([done, term.gone], return_when=asyncio.FIRST_COMPLETED)
                if not done.done():
                    log.info("ssh.command_cancelled", extra=kv(reason="session closed"))
                    scope.cancel()
            return await done
        except asyncio.CancelledError:  # the session's own task is being cancelled
            scope.cancel()
            raise
        finally:
            self._running.discard(scope)

    def _path(self, argv: list[str], *, group_alone: bool = False) -> tuple[str, ...]:
        """The command ``argv`` names: one word, or a group and its subcommand."""
        name = argv[0]
        if name not in ADMIN_COMMANDS:
            raise _Refused(f"unknown command {name!r} (type help for the list)")
        if name not in GROUPS:
            return (name,)
        sub = argv[1] if len(argv) > 1 else ""
        if sub not in GROUPS[name]:
            if sub == "--help" or (group_alone and not sub):
                return (name,)
            choices = ", ".join(GROUPS[name])
            raise _Refused(f"{name} needs one of: {choices}" + (f" (not {sub!r})" if sub else ""))
        return (name, sub)

    def _check(self, argv: list[str], path: tuple[str, ...], who: Identity) -> None:
        for opt in _options(argv):
            if opt == "--broker" or opt.startswith("--broker=") or _short_flags(opt, "b"):
                raise _Refused("--broker: the shell runs commands against this broker only")
        for name in WAIT_OPTIONS.get(path, ()):
            value = _option_value(argv, name)
            try:
                too_long = value is not None and not float(value) <= MAX_SHELL_WAIT_S
            except ValueError:
                too_long = False  # not a number: the command itself says so
            if too_long:
                raise _Refused(
                    f"{name}: at most {MAX_SHELL_WAIT_S:g} s in the shell (a waiting command "
                    "holds one of its few threads until it ends, even if you disconnect)"
                )
        if path in MUTATING and not who.admin:
            raise _Refused(
                f"`{' '.join(path)}` changes the broker and key {who.comment!r} is read-only "
                "(use an admin key)",
                EXIT_REFUSED,
            )

    def _invoke(self, argv: list[str], out: Console, err: Console) -> int:
        """In a worker thread: run the typer app as ``tq ARGV`` with output on the session."""
        with output.redirect(out, err):
            try:
                rv = self._root.main(args=argv, prog_name="tq", standalone_mode=False)
            except typer.TyperException as exc:  # usage errors: one line
                message = " ".join(exc.format_message().split())
                err.print(f"[bold red]tq:[/] {escape(message)}", highlight=False, soft_wrap=True)
                return exc.exit_code
            except typer.Abort:
                err.print("[bold red]tq:[/] aborted", highlight=False)
                return 1
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1
            except asyncio.CancelledError:  # its session went, or the broker is stopping
                return EXIT_CANCELLED
            except Exception as exc:  # a CLI bug costs this command, never the session
                log.exception("ssh.command_failed", extra=kv(command=shlex.join(argv[:1])))
                err.print(f"[bold red]tq:[/] internal error: {escape(str(exc))}", highlight=False)
                return 1
        return rv if isinstance(rv, int) else 0

    def _consoles(self, term: Terminal) -> tuple[Console, Console]:
        loop = asyncio.get_running_loop()

        def console(write: Callable[[str], None]) -> Console:
            color: Literal["256", "standard"] = "256" if "256" in term.term_type else "standard"
            return Console(
                file=_LoopWriter(loop, write),  # type: ignore[arg-type]
                width=max(term.width, 20),
                force_terminal=term.tty,
                color_system=color if term.tty else None,
                force_interactive=False,
                legacy_windows=False,
                emoji=False,
            )

        return console(term.write_out), console(term.write_err)

    def _refuse(self, term: Terminal, message: str, code: int) -> int:
        _, err = self._consoles(term)
        err.print(f"[bold red]tq:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return code

    # --- help and completion -------------------------------------------------------------------

    def _command(self, path: Sequence[str]) -> tuple[Any, Any]:
        """The click command at ``path`` and a context for it (for help and option names)."""
        cmd = self._root
        ctx = typer.Context(cmd, info_name="tq")
        for name in path:
            cmd = cmd.get_command(ctx, name)
            ctx = typer.Context(cmd, info_name=name, parent=ctx)
        return cmd, ctx

    def _help(self, args: list[str], who: Identity, out: Console, err: Console) -> int:
        if args:
            try:
                path = self._path(args, group_alone=True)
            except _Refused as exc:
                err.print(f"[bold red]tq:[/] {escape(exc.message)}", highlight=False)
                return exc.code
            text = self._command_help(path, who, min(out.width, 100))
            out.print(escape(text), highlight=False, soft_wrap=True)
            return 0
        rows = [(" ".join(path), self._short_help(path, who)) for path in self.command_paths()]
        rows += [("help [COMMAND]", "this list, or one command's options"), ("exit", "leave")]
        width = max(len(name) for name, _ in rows) + 2
        lines = [
            f"Commands (as the tq CLI runs them, on this broker; -o json|yaml for data; "
            f"your key is {who.role}):",
            *(f"  {name:<{width}}{text}" for name, text in rows),
        ]
        out.print(escape("\n".join(lines)), highlight=False, soft_wrap=True)
        return 0

    def _short_help(self, path: tuple[str, ...], who: Identity) -> str:
        cmd, _ = self._command(path)
        note = "" if who.admin or path not in MUTATING else " (admin keys only)"
        return f"{cmd.get_short_help_str(limit=70)}{note}"

    def _command_help(self, path: tuple[str, ...], who: Identity, width: int) -> str:
        """click's plain help for ``path`` without ``--broker`` (typer's rich help would print
        to the process's stdout), or a group's allowed subcommands."""
        cmd, ctx = self._command(path)
        ctx.terminal_width = width
        formatter = ctx.make_formatter()
        cmd.format_usage(ctx, formatter)
        cmd.format_help_text(ctx, formatter)
        if path[0] in GROUPS and len(path) == 1:
            subs = [(sub, self._short_help((*path, sub), who)) for sub in GROUPS[path[0]]]
            with formatter.section("Commands"):
                formatter.write_dl(subs)
        else:
            records: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
            for param in cmd.get_params(ctx):
                record = None if param.name == "broker" else param.get_help_record(ctx)
                if record is not None:
                    records[param.param_type_name].append(record)
            for kind, title in (("argument", "Arguments"), ("option", "Options")):
                if records[kind]:
                    with formatter.section(title):
                        formatter.write_dl(records[kind])
        return str(formatter.getvalue()).rstrip()

    def command_paths(self) -> list[tuple[str, ...]]:
        paths: list[tuple[str, ...]] = []
        for name in ADMIN_COMMANDS:
            if name in GROUPS:
                paths += [(name, sub) for sub in GROUPS[name]]
            else:
                paths.append((name,))
        return paths

    def completions(self, head: str, who: Identity) -> list[str]:
        """Words that complete the last word of ``head`` (the line up to the cursor)."""
        *done, prefix = head.split(" ")
        words = [w for w in done if w]
        names: list[str]
        if not words or words == ["help"]:
            names = [n for n in ADMIN_COMMANDS if who.admin or (n,) not in MUTATING]
            names += [] if words else ["help", "exit"]
        elif len(words) == 1 and words[0] in GROUPS:
            names = [s for s in GROUPS[words[0]] if who.admin or (words[0], s) not in MUTATING]
        elif prefix.startswith("-"):
            try:
                path = self._path(words)
            except _Refused:
                return []
            cmd, ctx = self._command(path)
            names = ["--help"]
            for param in cmd.get_params(ctx):
                names += [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
            names = [n for n in names if n != "--broker"]
        else:
            return []
        return sorted({n for n in names if n.startswith(prefix)})

    def complete(self, line: str, pos: int, who: Identity) -> tuple[str, int, list[str]]:
        """Tab at ``pos``: the new line and cursor, and the candidates to list when the word
        cannot be completed further (empty when it was, or when nothing matches)."""
        head, tail = line[:pos], line[pos:]
        word = head.rsplit(" ", 1)[-1]
        found = self.completions(head, who)
        if not found:
            return line, pos, []
        if len(found) == 1:
            insert = found[0][len(word) :] + ("" if tail.startswith(" ") else " ")
        else:
            insert = _common_prefix(found)[len(word) :]
            if not insert:
                return line, pos, found
        return head + insert + tail, pos + len(insert), []


def _common_prefix(words: list[str]) -> str:
    first, last = min(words), max(words)
    n = 0
    while n < len(first) and first[n] == last[n]:
        n += 1
    return first[:n]


def _options(argv: list[str]) -> list[str]:
    """The words of ``argv`` that look like options (up to a ``--``)."""
    opts = []
    for word in argv:
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1:
            opts.append(word)
    return opts


def _option_value(argv: list[str], name: str) -> str | None:
    """The value given to option ``name`` (``--x V`` or ``--x=V``; the last one wins)."""
    value = None
    for i, word in enumerate(argv):
        if word == "--":
            break
        if word == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


def _short_flags(word: str, flag: str) -> bool:
    """Whether ``word`` is a cluster of short options (``-wb``) that includes ``-flag``."""
    return not word.startswith("--") and flag in word[1:]


def printable(text: str) -> str:
    """``text`` with control characters escaped: what a client sends cannot forge log lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _audit(who: Identity, argv: list[str]) -> dict[str, Any]:
    """Who ran what: the command and the names of its options, never their values or the
    arguments (a submit's payload can hold a customer's secrets, and logs travel far)."""
    words = 2 if argv and argv[0] in GROUPS else 1
    options = sorted({o.split("=", 1)[0] for o in _options(argv[words:])})
    return {
        "key": who.comment,
        "fingerprint": who.fingerprint,
        "user": printable(who.user),
        "role": who.role,
        "peer": who.peer,
        "command": printable(" ".join(argv[:words])),
        "options": printable(" ".join(options)),
        "arguments": len(argv) - words,
    }
