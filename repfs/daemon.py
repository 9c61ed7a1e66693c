"""The site daemon: one trio run serving the FUSE mount (and, later, the control port and the
replication tasks), cancelled cleanly on unmount or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal

import pyfuse3
import trio

from .common import fuse_opt_value, setup_logging
from .fs.ops import Operations
from .mountopts import MountOptionError, MountOptions, current_options, kernel_remount
from .site import Site, SiteError
from .snap.keys import MetaError

log = logging.getLogger("repfs")


async def _commit_loop(ops: Operations, interval: float, sup, service=None) -> None:
    kernel_ro = service is None
    while True:
        await trio.sleep(interval)
        if ops.core.error is None:  # after a failed commit the file system is read-only
            try:
                await ops.commit()
            except OSError:
                if ops.core.error is None:
                    raise  # contained by the supervisor
                continue  # the core turned read-only and logged why, once
            sup.ok("commit")
        elif not kernel_ro:
            kernel_ro = await _remount_readonly(service, quiet=kernel_ro is None)
            kernel_ro = kernel_ro or None  # None: tried once, say nothing more


async def _remount_readonly(service, *, quiet: bool) -> bool:
    """errors=remount-ro in the kernel too, once the core turned read-only: the mount shows
    "ro" and the kernel refuses writes itself. Fails (EBUSY) while files are open for
    writing: tried again at the next tick; the core refuses every change meanwhile."""
    mp = service.mountpoint
    try:
        async with service.remounter.lock:  # one change of the mount's flags at a time
            opts = MountOptions.parse(current_options(mp) or "")
            opts.readonly = True
            await trio.to_thread.run_sync(kernel_remount, mp,
                                          opts.ms_flags(root=os.geteuid() == 0))
    except (OSError, MountOptionError) as e:
        if not quiet:
            log.info("cannot remount %s read-only yet (%s); the file system refuses every "
                     "change itself", mp, getattr(e, "strerror", None) or e)
        return False
    service.readonly = True
    log.info("remounted %s read-only after the error", mp)
    return True


async def _signal_loop(service) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for sig in sigs:
            log.info("signal %d: unmounting", sig)
            service.signalled = True  # (the kernel's mount is still there: serve unmounts it)
            pyfuse3.terminate()
            return


async def _serve(service, interval: float, control_sock, token: str, tls=None) -> None:
    from .control import ControlServer
    ops = service.ops
    async with trio.open_nursery() as nursery:
        await service.run(nursery)
        nursery.start_soon(service.supervisor.run, "commit", _commit_loop, ops, interval,
                           service.supervisor, service)
        nursery.start_soon(_signal_loop, service)
        nursery.start_soon(ops.tune_readahead, service.mountpoint)
        nursery.start_soon(ControlServer(service, token, metrics_open=service.site.settings()
                                         .metrics_open, tls=tls).serve, control_sock)
        await pyfuse3.main()
        await service.mounts.close_all()
        nursery.cancel_scope.cancel()
    if ops.core.error is None:
        try:
            await ops.commit()
        except OSError:  # logged by the core, which turned read-only: the redo log and the
            pass         # volume keep every commit that completed


def serve(site: Site, mountpoint: str, *, readonly: bool = False, writeback_cache: bool = False,
          listen: str | None = None, ready=None, mount_options: MountOptions | None = None
          ) -> None:
    """Mount and serve until unmounted. `ready(msg)` is called once: None on success, else
    with the one-line reason the mount failed (then this returns without serving)."""
    from .control import bind, ensure_token
    from .service import SiteService
    ready = ready or (lambda msg: None)
    try:
        site.lock()
        cfg_all = site.config()
        listen = listen or cfg_all.get("control", {}).get("listen", "127.0.0.1:0")
        try:
            control_sock = bind(listen)
        except (OSError, ValueError) as e:
            raise SiteError(f"cannot listen on {listen}: {getattr(e, 'strerror', None) or e}")
        token = ensure_token(site.path)  # (refuses a token file open to other users)
        if site.role() == "secondary":
            readonly = True  # a secondary's mount is read-only until failover
            if writeback_cache:  # (its kernel would keep stale sizes and times after playback)
                log.warning("%s is a secondary: mounted without --writeback-cache (after "
                            "each playback the kernel would keep stale file sizes and times)",
                            site.path)
                writeback_cache = False
        settings = site.settings()  # (a bad bound refuses the mount, one line)
        tls = site.tls_context()  # site.toml [tls]: the port speaks TLS only (one-line errors)
        core = site.open_fs(readonly=readonly, held_limit=settings.held_limit)
    except SiteError as e:
        site.unlock()
        ready(str(e))
        return
    cfg = cfg_all.get("fs", {})
    ops = Operations(core, writeback_cache=writeback_cache,
                     cache_timeout=float(cfg.get("cache_timeout", 5.0)))
    ops.HELD_LIMIT = settings.held_limit  # [memory] held_limit (bounds the daemon's memory)
    options = set(pyfuse3.default_options)
    # the site's path escaped for libfuse's option parser (a ',' would split it into options)
    options |= {f"fsname={fuse_opt_value(str(site.path))}", "subtype=repfs", "allow_other"}
    # nosuid, nodev, noexec, sync, atime... (repfs/mountopts.py); as root, suid and dev by default
    mopts = mount_options or MountOptions()
    options |= mopts.fuse_options(root=os.geteuid() == 0) - {"ro", "rw"}
    options.add("ro" if readonly else "rw")
    core.atime_mode = mopts.atime
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        core.close()
        core.dev.close()
        site.unlock()
        ready(f"cannot mount at {mountpoint}: {e}")
        return
    host, port = control_sock.getsockname()[:2]
    site.write_pid(mountpoint)
    site.write_control(host, port)
    try:
        service = SiteService(site, ops, mountpoint=mountpoint, readonly=readonly)
    except Exception as e:  # noqa: BLE001 - e.g. a damaged meta.lmdb: no mount left behind
        if not isinstance(e, MetaError):
            log.exception("starting the site's service failed")
        pyfuse3.close(unmount=True)
        core.close()
        core.dev.close()
        site.clear_pid()
        site.unlock()
        ready(f"{site.path}: {e}")
        return
    log.info("mounted %s at %s%s; control port %s:%d%s", site.path, mountpoint,
             " read-only" if readonly else "", host, port, " (TLS)" if tls else "")
    from .rcp.server import insecure_listen_warning
    service.security_warning = insecure_listen_warning(host) if tls is None else None
    service.tls = tls is not None  # (status: "tls")
    if service.security_warning:
        log.warning("%s", service.security_warning)
    ready(None)
    unmounted = False
    try:
        trio.run(_serve, service, float(cfg.get("commit_interval", 5.0)), control_sock, token,
                 tls)
        # pyfuse3.main returned: the kernel unmounted it (repfs umount, fusermount -u), or a
        # signal ended it and the mount is still there (a SIGTERM from systemd or kill left
        # a dead mount: 'Transport endpoint is not connected')
        unmounted = not getattr(service, "signalled", False)
    finally:
        try:
            pyfuse3.close(unmount=not unmounted)
        except Exception:  # noqa: BLE001 - best effort while going down
            log.exception("closing the FUSE session")
        try:
            ops.core.close()
        except Exception as e:  # noqa: BLE001 - the redo log replays what it holds at mount
            log.error("closing the file system of %s: %s", site.path, e)
        ops.core.dev.close()
        site.clear_pid()
        site.unlock()
        if ops.core.error is not None:
            log.info("unmounted %s; it had turned read-only after an error (%s): the next "
                     "mount replays the redo log", site.path, ops.core.error)
        else:
            log.info("unmounted %s; volume checkpointed", site.path)


def daemonize_and_serve(site: Site, mountpoint: str, *, log_file: str | None, **kw) -> str | None:
    """Fork a daemon that mounts and serves; return None once the mount is ready, or the
    reason it failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        try:
            os.setsid()
            if os.fork():  # leave the session leader, never regain a terminal
                os._exit(0)
            os.chdir("/")
            setup_logging(log_file or str(site.log_path))
            null = os.open(os.devnull, os.O_RDWR)
            logfd = os.open(log_file or str(site.log_path),
                            os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(null, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)

            def ready(msg):
                os.write(w, (msg or "ok").encode() + b"\n")
                os.close(w)

            serve(site, mountpoint, ready=ready, **kw)
            os._exit(0)
        except BaseException:  # noqa: BLE001
            log.exception("daemon failed")
            os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode(errors="replace").strip()
    if msg == "ok":
        return None
    return msg or "the daemon exited before the mount was ready (see the site's repfs.log)"
