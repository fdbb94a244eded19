"""A site machine no other local user can hijack (issue #30, finding 6): cmvim-client keeps its
guard script, privacy ledger and release log in its state folder, so a state folder that another
user owns, or can write into from above, would let that user's code run as the site. These tests
make the folders and try it; each refusal names the folder."""
from __future__ import annotations

import os
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
