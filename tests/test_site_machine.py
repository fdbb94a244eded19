"""A site machine no other local user can hijack (issue #30, findings 5 and 6). cmvim-client keeps
its guard script, privacy ledger and release log in its state folder, so a state folder that
another user owns, or can write into from above, would let that user's code run as the site; and
its warm worker takes tasks from a Runtime API port another user could bind first. These tests
make the folders and the foreign listener and try it; each refusal names what and whose."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cmvim.client.join import JoinError, private_folder

BIN = Path(sys.executable).parent
OTHER_USER = 4242         # a uid that is not the site's


def test_a_new_state_folder_is_made_private(tmp_path):
    folder = private_folder(tmp_path / "site" / "state")
    assert folder == (tmp_path / "site" / "state").resolve()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert folder.stat().st_uid == os.getuid()


def test_a_folder_the_site_made_group_writable_is_closed_again(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o775)
    private_folder(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_state_folder_owned_by_another_user_is_refused(tmp_path):
    """The finding: another user made the shared folder first. As the site's user (`uid`) is not
    its owner, the site refuses it rather than chmod it and run the guard script kept there."""
    folder = tmp_path / "shared-state"
    folder.mkdir(mode=0o700)
    guard = folder / "bin" / "flwr-clientapp"
    guard.parent.mkdir()
    guard.write_text("#!/bin/sh\necho someone else's code\n")
    with pytest.raises(JoinError, match="belongs to another user") as refused:
        private_folder(folder, uid=OTHER_USER)     # the site runs as OTHER_USER; the folder is this process's
    assert str(folder) in str(refused.value)
    if os.getuid() == 0:                            # root can also hand the folder to another uid for real
        os.chown(folder, OTHER_USER, OTHER_USER)
        with pytest.raises(JoinError, match=f"uid {OTHER_USER}"):
            private_folder(folder)


def test_a_folder_above_owned_by_another_user_is_refused(tmp_path):
    """Whoever owns a folder on the path can rename the site's folder away and put their own in
    its place, even when the site's folder is the site's."""
    above = tmp_path / "theirs"
    above.mkdir()
    if os.getuid() == 0:
        os.chown(above, OTHER_USER, OTHER_USER)
        uid = None
    else:
        uid = OTHER_USER + 1        # not root: pretend the site is a third user
    with pytest.raises(JoinError, match="belongs to another user") as refused:
        private_folder(above / "state", uid=uid)
    assert str(above) in str(refused.value)
    assert not (above / "state").exists(), "nothing is created below a folder the site does not control"


def test_a_world_writable_folder_above_without_the_sticky_bit_is_refused(tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    with pytest.raises(JoinError, match="writable by other users"):
        private_folder(open_folder / "state")
    open_folder.chmod(0o1777)                       # as /tmp: others cannot rename what is not theirs
    assert private_folder(open_folder / "state").is_dir()


def test_a_symlink_to_a_foreign_folder_is_judged_by_where_it_points(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(target)
    with pytest.raises(JoinError, match="belongs to another user"):
        private_folder(link, uid=OTHER_USER)


def test_cmvim_client_refuses_to_join_with_a_foreign_state_folder(tmp_path):
    """The command itself, before any SuperNode starts: exit 2 and the folder named."""
    if os.getuid() != 0:
        pytest.skip("handing a folder to another uid needs root")
    site = tmp_path / "A"
    site.mkdir()
    (site / "manifest.csv").write_text("subject_id,label,mri\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, OTHER_USER, OTHER_USER)
    done = subprocess.run([str(BIN / "cmvim-client"), "--site", "A", "--data", str(site), "--server",
                           "127.0.0.1:9", "--insecure", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "belongs to another user" in done.stderr and str(state) in done.stderr
    assert not (state / "bin").exists(), "no guard script was written into the foreign folder"


# -- finding 5: another local user takes the site's Runtime API port -------------------------------

def test_the_kernel_lists_our_own_listener_under_our_uid():
    from cmvim.client.local_guard import check_runtime_owner, listener_uids
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listener_uids(port) == {os.getuid()}
        check_runtime_owner(port)                        # ours: no complaint
    assert listener_uids(port) == set()
    check_runtime_owner(port)                            # nothing yet: the SuperNode is starting


def foreign_listener(uid: int) -> tuple[int, int, int]:
    """A process of another user (forked, then setuid) listening on a free loopback port; it
    writes a byte to the returned pipe for every connection it accepts. Returns (pid, port, pipe)."""
    ports_r, ports_w = os.pipe()
    seen_r, seen_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # the other user
        try:
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            os.write(ports_w, str(sock.getsockname()[1]).encode().ljust(8))
            while True:
                conn, _ = sock.accept()
                os.write(seen_w, b"c")
                conn.close()
        finally:
            os._exit(0)
    os.close(ports_w)
    os.close(seen_w)
    port = int(os.read(ports_r, 8))
    os.close(ports_r)
    return pid, port, seen_r


@pytest.mark.skipif(os.getuid() != 0, reason="running a process as another user needs root")
def test_a_runtime_port_held_by_another_user_gets_no_request_from_the_worker(tmp_path):
    """The port race of issue #30: another user binds the site's Runtime API port first. The warm
    worker, started on that port with the site's secret, never connects to it, and says why."""
    from cmvim.client.local_guard import ForeignRuntime, check_runtime_owner
    pid, port, seen = foreign_listener(OTHER_USER)
    try:
        with pytest.raises(ForeignRuntime, match=f"port {port} is held by another user \\(uid {OTHER_USER}\\)"):
            check_runtime_owner(port)
        secret = tmp_path / "worker.secret"
        secret.write_bytes(os.urandom(32))
        secret.chmod(0o600)
        worker = subprocess.run([sys.executable, "-m", "cmvim.client.worker", "--runtime-api-address",
                                 f"127.0.0.1:{port}", "--auth-secret-file", str(secret), "--site", "A",
                                 "--data", str(tmp_path), "--state-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=180)
        assert worker.returncode == 3, worker.stdout + worker.stderr
        assert "held by another user" in worker.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    connections = os.read(seen, 1024)
    os.close(seen)
    assert connections == b"", "the worker talked to another user's Runtime API"


def test_a_task_naming_another_policy_or_folder_is_refused_before_any_data_is_read(tmp_path):
    """What a foreign SuperNode would send: the site's worker runs under its own start-up
    settings, and a task that names others is refused, naming the key."""
    from cmvim.client.local_guard import ForeignRuntime, own_node_config
    own = {"site": "A", "data-dir": "/data/A", "state-dir": "/var/cmvim/A", "policy": "/etc/cmvim/policy.yaml",
           "device": None}
    given = {**{k: v for k, v in own.items() if v}, "partition-id": 0}     # what the site's SuperNode sends
    assert own_node_config(given, own) == given
    for key, value in (("policy", "/tmp/permissive.yaml"), ("state-dir", "/tmp/theirs"), ("data-dir", "/data/B"),
                       ("site", "B"), ("device", "cuda")):
        with pytest.raises(ForeignRuntime, match=f"node config {key}="):
            own_node_config({**own, key: value}, own)
    with pytest.raises(ForeignRuntime, match="node config policy=None"):
        own_node_config({k: v for k, v in own.items() if k != "policy"}, own)   # no policy: the defaults


def test_cold_mode_is_refused_outside_a_local_test(tmp_path):
    """--cold is Flower's process per task: its Runtime API has no authentication and each task's
    token is on a command line every local user can read. Only with --insecure (one machine)."""
    site = tmp_path / "A"
    site.mkdir()
    (site / "manifest.csv").write_text("subject_id,label,mri\n")
    done = subprocess.run([str(BIN / "cmvim-client"), "--site", "A", "--data", str(site), "--server", "127.0.0.1:9",
                           "--root-cert", str(tmp_path / "ca.crt"), "--auth-key", str(tmp_path / "A.key"),
                           "--cold", "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--cold" in done.stderr and "--insecure" in done.stderr, done.stderr
