"""The admin shell over SSH: an asyncssh server inside the broker's event loop (the only asyncssh
importer).

- Public-key authentication only, against OpenSSH ``authorized_keys`` files: keys of the admin
  file may run every shell command, keys of the read-only file only those that change nothing
  (a key in both files is read-only). Passwords, keyboard-interactive and host-based logins are
  refused; so are port, agent and X11 forwarding, SFTP and SCP.
- The host key lives in ``DATA_DIR/ssh_host_ed25519_key`` (created on first start, mode 0600,
  reused after); its SHA256 fingerprint is printed at start for ``known_hosts``.
- ``ssh -p PORT admin@HOST`` opens the interactive shell (asyncssh's line editor: editing,
  history, Tab completion); ``ssh -p PORT admin@HOST stats -o json`` runs one command and exits
  with its code. What a line does is tq/cli/shell.py's business.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from tq import __version__
from tq.cli.shell import EXEC_WIDTH, EXIT_USAGE, EXIT_WORDS, Identity, Shell, Terminal, printable
from tq.errors import TqError
from tq.logfields import kv

if TYPE_CHECKING:
    from tq.broker.app import BrokerApp

log = logging.getLogger("tq.ssh")

HOST_KEY_FILE = "ssh_host_ed25519_key"
LOGIN_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """One line of an authorized_keys file: the key with its options (``from=``, ...)."""

    entry: asyncssh.SSHAuthorizedKeys
    comment: str
    admin: bool


def read_keys(path: str, *, admin: bool) -> list[AuthorizedKey]:
    """Every key of an OpenSSH authorized_keys file; ``ValueError`` naming the file (and line)
    when it cannot be read, has a line that is not a key, or has no key at all."""
    try:
        text = Path(path).read_text()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file") from None
    if mode & 0o022:  # as sshd's StrictModes: whoever can write it can let themselves in
        raise ValueError(
            f"{path} can be written by other users (mode {stat.S_IMODE(mode):o}): anyone could "
            "add a key to it; chmod go-w it"
        )
    keys = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = asyncssh.import_authorized_keys(line)
        except ValueError:  # asyncssh's KeyImportError too
            raise ValueError(f"{path}:{n}: not an OpenSSH authorized_keys entry") from None
        options, comment = _split(line)
        # Only from= is honoured. An admin who writes command="stats" or restrict expects the
        # key bound by it; ignored, the key could do everything its file allows.
        for name in _option_names(options):
            if name != "from":
                raise ValueError(
                    f"{path}:{n}: option {name} is not supported (only from= is honoured)"
                )
        keys.append(AuthorizedKey(entry, comment or f"{Path(path).name}:{n}", admin))
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def _split(line: str) -> tuple[str, str]:
    """An authorized_keys line's options (before the key) and the key's comment."""
    words = line.split()
    for i in range(len(words)):
        try:
            key = asyncssh.import_public_key(" ".join(words[i:]))
        except ValueError:
            continue
        return " ".join(words[:i]), key.get_comment() or ""
    return "", ""


def _option_names(options: str) -> list[str]:
    """The names in ``opt,opt="a,b",...`` (commas inside quotes do not split). asyncssh parses
    options too, but keeps them only in private attributes."""
    names, current, quoted = [], "", False
    for ch in options + ",":
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            if current.strip():
                names.append(current.split("=", 1)[0].strip().lower())
            current = ""
        else:
            current += ch
    return names


class KeyRing:
    """Admin and read-only keys; ``match`` finds the one a client proved it holds."""

    def __init__(self, keys: list[AuthorizedKey]) -> None:
        self.keys = keys

    def match(self, key: asyncssh.SSHKey, client_addr: str) -> AuthorizedKey | None:
        found = [
            k for k in self.keys if k.entry.validate(key, client_addr, client_addr) is not None
        ]
        if not found:
            return None
        return min(found, key=lambda k: k.admin)  # listed as read-only too: read-only


def load_host_key(data_dir: str) -> tuple[asyncssh.SSHKey, bool]:
    """The broker's SSH host key, created (mode 0600) on first use; and whether it was."""
    path = Path(data_dir) / HOST_KEY_FILE
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise TqError(
                f"the ssh host key {path} can be read by other users (mode "
                f"{stat.S_IMODE(mode):o}): chmod 600 it, or delete it for a new one"
            )
        return asyncssh.read_private_key(path), False
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise TqError(f"cannot read the ssh host key {path}: {exc}") from None
    key = asyncssh.generate_private_key("ssh-ed25519", comment="tq broker host key")
    tmp = path.with_name(HOST_KEY_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # a leftover .tmp keeps its mode otherwise
        fh.write(key.export_private_key())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # whole or absent, never a truncated key
    key.write_public_key(path.with_name(HOST_KEY_FILE + ".pub"))
    return key, True


def _loopback(host: str) -> str:
    """Where the shell reaches the broker's own TCP port."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class SshServer:
    """The SSH admin shell as a broker service (``BrokerApp.services``): ``start()`` binds on the
    broker's ``--host``, ``stop()`` closes the listener and every session."""

    def __init__(self, broker: BrokerApp, port: int, keys: list[AuthorizedKey]) -> None:
        self.broker = broker
        self.host = broker.config.host
        self.port = port
        self.keyring = KeyRing(keys)
        self.shell: Shell | None = None
        self.fingerprint = ""
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()

    async def start(self) -> None:
        host_key, created = load_host_key(self.broker.config.data_dir)
        self.fingerprint = host_key.get_fingerprint("sha256")
        if not log.isEnabledFor(logging.DEBUG):  # asyncssh logs every connection step at info
            logging.getLogger("asyncssh").setLevel(logging.WARNING)
        self.shell = Shell(f"tcp://{_loopback(self.host)}:{self.broker.port}")
        try:
            self._acceptor = await asyncssh.create_server(
                lambda: _Connection(self),
                self.host,
                self.port,
                server_host_keys=[host_key],
                process_factory=self._session,
                server_version=f"tq_{__version__}",
                public_key_auth=True,
                password_auth=False,
                kbdint_auth=False,
                host_based_auth=False,
                gss_kex=False,
                gss_auth=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_scp=False,
                line_editor=True,
                line_history=500,
                login_timeout=LOGIN_TIMEOUT_S,
            )
        except OSError as exc:
            raise TqError(
                f"cannot start ssh on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        self.port = self._acceptor.get_port()
        # Tests and operators read this line: the port bound and the host key to trust.
        print(
            f"tq ssh listening on {self.host}:{self.port} (host key {self.fingerprint})",
            flush=True,
        )
        log.info(
            "ssh.started",
            extra=kv(
                host=self.host,
                port=self.port,
                host_key=self.fingerprint,
                host_key_created=created,
                admin_keys=sum(k.admin for k in self.keyring.keys),
                readonly_keys=sum(not k.admin for k in self.keyring.keys),
            ),
        )

    async def stop(self) -> None:
        if self._acceptor is None:
            return
        self._acceptor.close()
        for conn in list(self._connections):
            conn.close()
        for conn in list(self._connections):
            try:
                await asyncio.wait_for(conn.wait_closed(), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("ssh.close_timeout", extra=kv(peer=_peer(conn)))
        await self._acceptor.wait_closed()
        self._acceptor = None
        if self.shell is not None:
            self.shell.close()
        log.info("ssh.stopped")

    # --- sessions --------------------------------------------------------------------------------

    async def _session(self, process: asyncssh.SSHServerProcess[str]) -> None:
        who: Identity | None = process.get_extra_info("tq_identity")
        assert who is not None  # set when the key was accepted
        assert self.shell is not None
        shell = self.shell
        if process.subsystem is not None:  # asyncssh accepts any but sftp with a process_factory
            _write(
                process.stderr, f"tq: subsystem {printable(process.subsystem)} is not supported\n"
            )
            process.exit(EXIT_USAGE)
            return
        # Done when the client goes: the command it left running is cancelled.
        gone = asyncio.ensure_future(process.channel.wait_closed())
        try:
            if process.command is not None:
                code = await shell.run_line(process.command, who, _terminal(process, gone))
            else:
                code = await _repl(shell, process, who, gone)
        except (asyncssh.Error, BrokenPipeError):  # the client went away, or the server stops
            return
        except Exception:  # one session's failure must not reach the broker
            log.exception("ssh.session_failed", extra=kv(peer=who.peer, key=who.comment))
            code = 1
        finally:
            gone.cancel()
        if not process.is_closing():
            process.exit(code)


def _terminal(
    process: asyncssh.SSHServerProcess[str], gone: asyncio.Future[Any] | None = None
) -> Terminal:
    term_type = process.term_type or ""
    width = process.term_size[0] if term_type else 0
    # On a terminal, errors share the screen with the output (as a shell's stderr would, and
    # asyncssh's line editor only translates newlines on the main stream).
    err = process.stdout if term_type else process.stderr
    return Terminal(
        write_out=lambda text: _write(process.stdout, text),
        write_err=lambda text: _write(err, text),
        width=width or EXEC_WIDTH,
        tty=bool(term_type),
        term_type=term_type,
        gone=gone,
    )


def _write(stream: asyncssh.SSHWriter[str], text: str) -> None:
    if not stream.channel.is_closing():
        stream.write(text)


async def _repl(
    shell: Shell,
    process: asyncssh.SSHServerProcess[str],
    who: Identity,
    gone: asyncio.Future[Any] | None = None,
) -> int:
    """The interactive shell: prompt, read a line (edited by asyncssh), run it, until ``exit``
    or Ctrl-D. Ctrl-C drops the line being typed."""
    prompt = "tq> " if who.admin else "tq (read-only)> "
    channel: Any = process.channel  # asyncssh's line-editor channel when a PTY was requested
    loop = asyncio.get_running_loop()
    if process.term_type:

        def tab(line: str, pos: int) -> tuple[str, int] | bool:
            new_line, new_pos, choices = shell.complete(line, pos, who)
            if choices:  # list them under the line, then prompt again with the line as it was
                loop.call_soon(_write, process.stdout, f"{line}\n{'  '.join(choices)}\n{prompt}")
            elif new_line == line:
                return False  # the bell: nothing to complete
            return new_line, new_pos

        channel.register_key("\t", tab)
    _write(
        process.stdout,
        f"tq {__version__} admin shell, key {who.comment!r} ({who.role}). "
        "Type help for the commands, exit to leave.\n",
    )
    code = 0
    prompt_again = True
    while True:
        if prompt_again:
            _write(process.stdout, prompt)
        prompt_again = True
        try:
            line = await process.stdin.readline()
        except asyncssh.BreakReceived:  # Ctrl-C: forget the line
            if process.term_type:
                channel.clear_input()
            _write(process.stdout, "^C\n")
            continue
        except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived):
            prompt_again = False  # the line being typed stays; the next command uses the size
            continue
        if not line:  # Ctrl-D or the client closed its side
            _write(process.stdout, "\n")
            return code
        if line.strip() in EXIT_WORDS:
            return code
        code = await shell.run_line(line, who, _terminal(process, gone))


def _peer(conn: asyncssh.SSHServerConnection) -> str:
    peer = conn.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"


class _Connection(asyncssh.SSHServer):
    """One SSH connection: authentication against the key ring. Nothing else is offered."""

    def __init__(self, server: SshServer) -> None:
        self._server = server
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer = "?"
        self._offered: tuple[str, AuthorizedKey, str] | None = None  # user, key, fingerprint

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._peer = _peer(conn)
        self._server._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._server._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True  # always authenticate

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh calls this for every key offered, and again (just before checking its
        # signature) for the key a client logs in with: the last key matched is the one used.
        addr = self._peer.rpartition(":")[0]
        found = self._server.keyring.match(key, addr)
        fingerprint = key.get_fingerprint("sha256")
        if found is None:
            self._offered = None
            log.warning(
                "ssh.key_refused",
                extra=kv(user=printable(username), peer=self._peer, key=fingerprint),
            )
            return False
        self._offered = (username, found, fingerprint)
        return True

    def auth_completed(self) -> None:
        assert self._offered is not None
        assert self._conn is not None
        user, found, fingerprint = self._offered
        who = Identity(user, found.comment, fingerprint, found.admin, self._peer)
        self._conn.set_extra_info(tq_identity=who)
        log.info(
            "ssh.login",
            extra=kv(user=printable(who.user), key=who.comment, role=who.role, peer=who.peer),
        )
